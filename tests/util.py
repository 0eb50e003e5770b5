"""Random test cases shared by the backend tests."""
import torch


def make_case(shape, V, dtype, *, seed=0, device="cpu", mask_frac=0.2, ignore_frac=0.1,
              ratio_spread=0.3, ref=True, masked_seq=True, ignore_index=-100):
    """logits, ids, old, adv, mask, ref for a [N] or [B, T] token shape.

    old / ref log-probs are the true log-probs plus noise, so ratios sit around
    1 as in training; padding positions hold inf / NaN garbage that no backend
    may read into the loss.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, shape, generator=g)
    ids[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    old = (logp + ratio_spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) >= mask_frac).float()
    if len(shape) == 2 and masked_seq and shape[0] > 1:
        mask[1] = 0  # a fully masked sequence
    old[mask == 0] = float("inf")
    adv[mask == 0] = float("nan")
    refl = None
    if ref:
        refl = (logp + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
        refl[mask == 0] = float("-inf")
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(logits), to(ids), to(old), to(adv), to(mask), to(refl)
