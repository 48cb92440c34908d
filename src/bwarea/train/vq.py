"""The action codebook's vector-quantisation helpers, shared by stage 1 (pretrain.py) and stage 2 (bc.py):
distances to the codes, k-means initialisation, and code-usage statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def usage_metrics(counts: torch.Tensor) -> dict:
    """Code counts (num_actions,) -> codes used and usage perplexity exp(H(counts / total))."""
    total = counts.sum()
    if total <= 0:
        return {"codes_used": 0, "code_perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "code_perplexity": float(entropy.exp())}


def soft_usage_entropy(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean soft assignment of latents z (..., dim) to codes (n, dim): high when usage is even."""
    dist = squared_distances(z.reshape(-1, z.shape[-1]), codes.float())
    p = torch.softmax(-dist / dist.mean().detach().clamp_min(1e-8), dim=-1).mean(0)
    return -(p * p.clamp_min(1e-12).log()).sum()


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (n, dim), c (k, dim) -> (n, k) squared Euclidean distances (one matmul; cdist is slow on CPU)."""
    return (x.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1) - 2 * x @ c.t()).clamp_min(0)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, dim) -> (centroids (k, dim), counts (k,)); k-means++ seeding, empty clusters re-seeded."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    if len(x) < k:
        raise ValueError(f"k-means needs at least {k} latents, got {len(x)}; raise --kmeans-batches")
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    nearest = squared_distances(x, centroids).squeeze(1)
    for _ in range(1, k):
        # k-means++: the next centre is drawn with probability proportional to the squared distance.
        probs = (nearest / nearest.sum()).cpu() if nearest.sum() > 0 else torch.full((len(x),), 1 / len(x))
        new = x[torch.multinomial(probs, 1, generator=g).to(x.device)]
        centroids = torch.cat([centroids, new])
        nearest = torch.minimum(nearest, squared_distances(x, new).squeeze(1))
    for _ in range(iters):
        onehot = F.one_hot(squared_distances(x, centroids).argmin(dim=1), k).float()
        counts = onehot.sum(0)
        empty = counts == 0
        centroids = torch.where(empty[:, None], x[torch.randint(len(x), (k,), generator=g).to(x.device)],
                                onehot.t() @ x / counts.clamp_min(1)[:, None])
    counts = torch.bincount(squared_distances(x, centroids).argmin(dim=1), minlength=k).float()
    return centroids, counts
