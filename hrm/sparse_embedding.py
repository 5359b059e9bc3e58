"""Sparse puzzle embedding (stub, being implemented)."""
import torch.nn as nn
class CastedSparseEmbedding(nn.Module): pass
class CastedSparseEmbeddingSignSGD: pass
