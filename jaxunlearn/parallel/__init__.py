"""Devices and meshes: logical-axis sharding rules and CPU device setup."""
