"""Model (stub, being implemented)."""
import torch.nn as nn
class HRM(nn.Module): pass
class HRMInner(nn.Module): pass
class HRMCarry: pass
class HRMInnerCarry: pass
