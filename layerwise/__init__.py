"""layerwise: layer-selective fine-tuning that saves real time and memory."""

import logging as _logging

__version__ = "0.1.0"


class _CpuBuildTorchaoKernels(_logging.Filter):
    """transformers imports torchao when it is installed (``train.frozen_dtype=int8``); with a CPU build of
    torch, torchao then warns on every run that its CUDA kernel libraries do not load. Only those lines are
    dropped, and only when torch has no CUDA."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        if not (message.startswith("Failed to load") and ".so" in message):
            return True
        import sys

        torch = sys.modules.get("torch")
        return not (torch is not None and getattr(torch.version, "cuda", None) is None)


class _TorchaoEnumConstants(_logging.Filter):
    """torch 2.13 warns, for each of torchao's enums, that ``register_constant()`` on an Enum is deprecated."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "register_constant() on Enum subclasses is deprecated" not in record.getMessage()


_logging.getLogger("torchao").addFilter(_CpuBuildTorchaoKernels())
_logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumConstants())
