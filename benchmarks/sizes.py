"""Model shapes shared by the benchmark scripts."""

SIZES = {
    # ~5M parameters: 2k BPE vocabulary, 256 wide, 5 layers
    "5m": dict(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=5, num_heads=4, num_kv_heads=4, head_dim=64
    ),
    # ~1.1B parameters (TinyLlama-like shape, 32k vocabulary)
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        head_dim=64,
    ),
}
