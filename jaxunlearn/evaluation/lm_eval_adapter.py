"""An lm-evaluation-harness (0.4.x) model backed by jaxunlearn: MMLU, ARC, HellaSwag, WMDP, ... for any
jaxunlearn model, through the same evaluation loop as every other metric.

    import lm_eval
    from jaxunlearn.evaluation.lm_eval_adapter import JaxUnlearnLM
    lm = JaxUnlearnLM.from_pretrained("runs/ga_kl/hf_model")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

or from the command line, once this module is imported by a plugin: ``--model jaxunlearn
--model_args pretrained=runs/ga_kl/hf_model``. Requires ``pip install lm_eval==0.4.13`` (not a core
dependency). Tokenisation is that version's HFLM's: ``add_bos_token`` unset keeps the tokenizer's own special tokens
(BOS for Llama and Mistral), ``True``/``False`` forces BOS on or off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.multiple_choice import prefix_token_id, tok_encode
from jaxunlearn.models import split_model
from jaxunlearn.models.generation import generate
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_tokenizer
from jaxunlearn.parallel import sharding


@register_model("jaxunlearn")
class JaxUnlearnLM(TemplateLM):
    """``loglikelihood``, ``loglikelihood_rolling`` and greedy ``generate_until`` for lm-evaluation-harness."""

    def __init__(
        self,
        evaluator: Evaluator | None = None,
        params: dict | None = None,
        tokenizer: Any = None,
        *,
        pretrained: str | None = None,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        batch_size: int | str = 8,
        add_bos_token: bool | None = None,
        dtype: str = "bfloat16",
        **_: Any,
    ):
        super().__init__()
        if pretrained is not None:  # built by lm_eval from --model_args
            evaluator, params, tokenizer = _load(pretrained, int(batch_size), dtype)
        if evaluator is None or params is None or tokenizer is None:
            raise ValueError("JaxUnlearnLM needs (evaluator, params, tokenizer) or pretrained=PATH")
        self.evaluator, self.params, self.tokenizer = evaluator, params, tokenizer
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        # lm-eval 0.4.13's HFLM: None (its default since 0.4.10) keeps the tokenizer's own special tokens
        self.add_bos_token = None if add_bos_token is None else bool(add_bos_token)

    @classmethod
    def from_pretrained(cls, path: str, *, batch_size: int = 8, dtype: str = "bfloat16", **kwargs: Any) -> JaxUnlearnLM:
        evaluator, params, tokenizer = _load(path, batch_size, dtype)
        return cls(evaluator, params, tokenizer, **kwargs)

    # --- tokenizer -----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As lm-eval 0.4.13's ``HFLM.tok_encode`` (:func:`~jaxunlearn.evaluation.multiple_choice.tok_encode`)."""
        return tok_encode(self.tokenizer, string, add_special_tokens, self.add_bos_token)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- requests ------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self.evaluator.score_continuations(self.params, pairs, self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, *window))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = np.zeros(len(requests))
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str] = []
        for context, gen_kwargs in (req.args for req in requests):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            tokens = generate(
                self.evaluator.lm,
                self.params,
                np.asarray([ids]),
                max_new_tokens=max_new,
                mesh=self.evaluator.mesh,
                batch_size=1,
                rules=self.evaluator.rules,
            )[0]
            text = self.tok_decode(tokens.tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            outputs.append(text)
        return outputs


def _load(path: str, batch_size: int, dtype: str):

    mesh = sharding.make_mesh()
    lm, params = split_model(from_pretrained(path, mesh=mesh, dtype=dtype))
    return Evaluator(lm, mesh, batch_size=batch_size), params, load_tokenizer(path)
