"""A tiny run configuration for engine tests: resnet18 on the synthetic subtypes at 32 px, fp32."""

from __future__ import annotations

from histotoken.config import RunConfig


def tiny_config(root, **changes) -> RunConfig:
    values = dict(
        data=str(root), model="resnet18", task="subtype", train_domain="100", img_size=32,
        epochs=1, batch_size=16, precision="32-true", seed=0, bootstrap=100,
    )
    values.update(changes)
    return RunConfig(**values)
