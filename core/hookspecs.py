"""Hook specifications: one ``register_<kind>(register)`` hook per component kind.

A plugin module implements any of them with ``@hookimpl`` and calls ``register(name, cls)`` for
each component it provides; ``cls.Config`` is a pydantic model with ``type: Literal[name]``.
"""
import pluggy

PROJECT = "vtok"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = ("quantizers", "projectors", "encoders", "decoders", "losses", "evaluators", "datasets")


@hookspec
def register_quantizers(register):
    """Register Quantizer subclasses: ``register("vq", VQ)``."""


@hookspec
def register_projectors(register):
    """Register Projector subclasses."""


@hookspec
def register_encoders(register):
    """Register Encoder subclasses."""


@hookspec
def register_decoders(register):
    """Register Decoder subclasses."""


@hookspec
def register_losses(register):
    """Register Loss subclasses."""


@hookspec
def register_evaluators(register):
    """Register Evaluator subclasses."""


@hookspec
def register_datasets(register):
    """Register Dataset subclasses."""
