# Copyright (c) fasa_seesaw contributors.
"""Save and restore every random-number generator a pass can touch."""

import contextlib
import numpy as np
import random
import torch

__all__ = ["get_rng_states", "set_rng_states", "preserved_rng_states"]


def _accelerators():
    """(name, module) of the accelerator backends present, each with its own generators."""
    out = []
    for name in ("cuda", "xpu"):
        mod = getattr(torch, name, None)
        # Not initialised: nothing has drawn from its generators (and a CPU run stays CPU-only).
        if mod is not None and mod.is_available() and mod.is_initialized():
            out.append((name, mod))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("mps", torch.mps))
    return out


def get_rng_states() -> dict:
    """The states of python's, numpy's and torch's CPU generator, and of every generator of each
    accelerator present (all CUDA / XPU devices, the MPS device)."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    for name, mod in _accelerators():
        states[name] = (
            mod.get_rng_state_all() if hasattr(mod, "get_rng_state_all") else [mod.get_rng_state()]
        )
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    for name, mod in _accelerators():
        if name not in states:
            continue
        if hasattr(mod, "set_rng_state_all"):
            mod.set_rng_state_all(states[name])
        else:
            mod.set_rng_state(states[name][0])


@contextlib.contextmanager
def preserved_rng_states():
    """Inside, generators may advance; on exit (also on error) all are back where they were."""
    states = get_rng_states()
    try:
        yield states
    finally:
        set_rng_states(states)
