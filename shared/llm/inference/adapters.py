"""Named LoRA adapters served together on one model (`llm.core.multi_lora`).

`AdapterSet(model, max_loras, max_rank)` wraps the model once, with room for `max_loras`
adapters; `load(name, directory)` reads a PEFT adapter directory into a free index and
`unload(name)` zeros it; a request's `adapter` is `index(name)` (0 for the base). Loading
and unloading change weights in place: call them between model calls (the engine runs
them on its scheduler thread), and have the scheduler forget the unloaded index's cached
prefixes (`StepScheduler.drop_adapter`) before another adapter takes it.

An unload may drain instead: `retire(name)` forgets the name at once (no new request can
pick it) but keeps its index and weights for the requests already running with it, and
`release(index)` zeros and frees the index once the last of them ended.
"""

from __future__ import annotations

import os

from llm.core.lora import LoRALinear
from llm.core.multi_lora import apply_multi_lora, multi_lora_layers
from llm.interop.peft import adapter_layers
from llm.models.decoder import DecoderModel


class AdapterSet:
    def __init__(self, model: DecoderModel, max_loras: int, max_rank: int) -> None:
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.rows = apply_multi_lora(model, max_loras, max_rank)
        self.layers = multi_lora_layers(model)
        self._index: dict[str, int] = {}
        self.paths: dict[str, str] = {}  # name -> where it was loaded from
        self.retired: set[int] = set()  # indices unloaded but still in use until `release`

    @property
    def names(self) -> list[str]:
        return sorted(self._index)

    @property
    def free_indices(self) -> list[int]:
        """Indices neither a loaded adapter nor an unloaded one still in use holds."""
        return sorted(set(range(1, self.max_loras + 1)) - set(self._index.values()) - self.retired)

    def index(self, name: str) -> int:
        """The adapter's index; KeyError if none of that name is loaded."""
        return self._index[name]

    def load(self, name: str, directory: str | os.PathLike[str], path: str | None = None) -> int:
        """Read a PEFT adapter directory into a free index; returns it. `path` is what to
        report it as loaded from (default: `directory`). Raises ValueError on a name in
        use, no free index, or an adapter the served layers or rank cannot hold."""
        return self.install(name, self.read(name, directory), path or str(directory))

    def read(self, name: str, directory: str | os.PathLike[str]) -> dict[str, LoRALinear]:
        """An adapter directory's layers, checked against what is served; touches no
        served weight (so it may run while the model does)."""
        loras = adapter_layers(self.model, directory)
        if outside := sorted(set(loras) - set(self.layers)):
            raise ValueError(f"adapter {name!r} adapts layers served without LoRA: {outside}")
        if too_big := sorted(n for n, lora in loras.items() if lora.r > self.max_rank):
            raise ValueError(
                f"adapter {name!r} has rank above the served maximum {self.max_rank} in {too_big}"
            )
        return loras

    def install(self, name: str, loras: dict[str, LoRALinear], path: str) -> int:
        """Copy `read`'s layers into a free index (between model calls); returns it."""
        if name in self._index:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        free = self.free_indices
        if not free:
            raise ValueError(f"{self.max_loras} adapters are loaded already (the most served)")
        for layer_name, layer in self.layers.items():
            layer.set_adapter(free[0], loras.get(layer_name))
        self._index[name] = free[0]
        self.paths[name] = path
        return free[0]

    def unload(self, name: str) -> int:
        """Zero the adapter's index and free it; returns the index. KeyError if unknown."""
        index = self.retire(name)
        self.release(index)
        return index

    def retire(self, name: str) -> int:
        """Forget the adapter's name (KeyError if unknown) but keep its index and weights,
        for the requests running with it, until `release`; returns the index."""
        index = self._index.pop(name)
        del self.paths[name]
        self.retired.add(index)
        return index

    def release(self, index: int) -> None:
        """Zero a retired index and free it (between model calls)."""
        self.retired.remove(index)
        for layer in self.layers.values():
            layer.set_adapter(index, None)
