"""Checkpoint loading (stub, being implemented)."""
def load_checkpoint(*a, **k): raise NotImplementedError
def normalize_state_dict(*a, **k): raise NotImplementedError
