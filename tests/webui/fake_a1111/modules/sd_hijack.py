"""Mirrors modules/sd_hijack.py: apply_optimizations() / undo_optimizations().

The real ones swap ldm's CrossAttention.forward (and AttnBlock.forward) at class level; the
fake swaps CrossAttention.forward between ldm's own and a marked copy, so a test can see it."""
import ldm.modules.attention

original_forward = ldm.modules.attention.CrossAttention.forward


def _optimized_forward(self, x, context=None, mask=None):
    return original_forward(self, x, context=context, mask=mask)


_optimized_forward.optimized = True


def apply_optimizations(option=None):
    undo_optimizations()
    ldm.modules.attention.CrossAttention.forward = _optimized_forward
    return "fake-sdp"


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = original_forward


def optimizations_applied():  # test-only
    return getattr(ldm.modules.attention.CrossAttention.forward, "optimized", False)
