"""EMA vector quantiser of the patch-volume autoencoder (spec §1.2, official ``codebook.py``).

8192 codes × 8 dims (paper), squared-Euclidean nearest code, no L2 normalisation. Embeddings, EMA
counts ``N`` and sums ``z_avg`` are buffers: the codebook has 0 ``nn.Parameter``s.

Official bug fixed (spec §6.1, flag ``ae.codebook_init_buffer``, default on): the "needs init" flag is a
buffer (``initialized``) saved in the state dict, so loading a trained codebook and running a train-mode
forward no longer re-initialises it. ``frozen`` (set for stage 2) disables every update whatever the
module's train/eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def channels_last(z: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) → (B·ΠS, C)."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


class Codebook(nn.Module):
    def __init__(
        self,
        n_codes: int = 8192,
        embedding_dim: int = 8,
        decay: float = 0.99,
        eps: float = 1e-7,
        commitment: float = 0.25,
        restart_thres: float = 1.0,
        random_restart: bool = True,
        init_flag_buffer: bool = True,
    ):
        super().__init__()
        self.n_codes = n_codes
        self.embedding_dim = embedding_dim
        self.decay = decay
        self.eps = eps
        self.commitment = commitment
        self.restart_thres = restart_thres
        self.random_restart = random_restart
        self.init_flag_buffer = init_flag_buffer
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        if init_flag_buffer:
            self.register_buffer("initialized", torch.tensor(False))
        else:  # official behaviour: a plain attribute, lost on reload (spec §6.1)
            self._need_init = True
        self.frozen = False  # stage 2: no init, EMA or restart, whatever train()/eval() says
        # run.deterministic (issue 18): set by the training loop each step to a generator keyed by (seed,
        # step); restart codes are then drawn from the whole global batch in global order with it, so N
        # ranks draw what one process draws. None: the official per-rank draw broadcast from rank 0
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ init / restart helpers
    @property
    def needs_init(self) -> bool:
        if self.init_flag_buffer:
            return not bool(self.initialized)
        return self._need_init

    def _mark_initialized(self) -> None:
        if self.init_flag_buffer:
            self.initialized.fill_(True)
        else:
            self._need_init = False

    def mark_initialized(self) -> None:
        """For codebooks loaded from a trained (e.g. official) checkpoint."""
        self._mark_initialized()

    def _tile(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        d, ew = x.shape
        if d < self.n_codes:
            n_repeats = (self.n_codes + d - 1) // d
            x = x.repeat(n_repeats, 1)
            if generator is None:
                noise = torch.randn_like(x)
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + noise * (0.01 / math.sqrt(ew))
        return x

    def _random_codes(self, flat: torch.Tensor, batch: int) -> torch.Tensor:
        """``n_codes`` vectors drawn from ``flat`` (the ``batch`` samples' latents, batch-major), tiled with
        a little noise when there are fewer vectors than codes."""
        g = self.generator
        if g is None:
            y = self._tile(flat)
            k = y[torch.randperm(y.shape[0], device=y.device)][: self.n_codes].contiguous()
            if _dist_on():
                dist.broadcast(k, 0)
            return k
        if _dist_on():  # the global batch in global order: sample j of rank r is sample j * world + r
            parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, flat.contiguous())
            per = flat.shape[0] // batch
            flat = torch.stack([p.view(batch, per, -1) for p in parts], 1).reshape(-1, flat.shape[1])
        y = self._tile(flat, g)
        return y[torch.randperm(y.shape[0], generator=g).to(y.device)][: self.n_codes].contiguous()

    @torch.no_grad()
    def _init_embeddings(self, flat: torch.Tensor, batch: int) -> None:
        k = self._random_codes(flat, batch)
        self.embeddings.copy_(k)
        self.z_avg.copy_(k)
        self.N.fill_(1.0)
        self._mark_initialized()

    @property
    def updating(self) -> bool:
        return self.training and not self.frozen

    # ------------------------------------------------------------------------------ forward
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean, the official expansion) for (M, C) vectors."""
        e = self.embeddings
        distances = (
            (flat**2).sum(dim=1, keepdim=True) - 2 * flat @ e.t() + (e.t() ** 2).sum(dim=0, keepdim=True)
        )
        return torch.argmin(distances, dim=1)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) latents → (B, *S) code indices; pure (never updates the codebook)."""
        self._check(z)
        return self.nearest(channels_last(z.float())).view(z.shape[0], *z.shape[2:])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, *S) indices → (B, C, *S) code vectors."""
        return F.embedding(indices, self.embeddings).movedim(-1, 1).contiguous()

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"codebook expects latents (B, {self.embedding_dim}, ...), got shape {tuple(z.shape)}"
            )

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(z)
        if z.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", enabled=False):  # distances and EMA counts stay fp32 under AMP
                return self.forward(z.float())
        flat = channels_last(z)
        if self.updating and self.needs_init:
            self._init_embeddings(flat.detach(), z.shape[0])
        idx = self.nearest(flat)
        onehot = F.one_hot(idx, self.n_codes).type_as(flat)
        indices = idx.view(z.shape[0], *z.shape[2:])
        embeddings = self.lookup(indices)
        commitment_loss = self.commitment * F.mse_loss(z, embeddings.detach())

        if self.updating:  # EMA update + dead-code restart (spec §1.2)
            with torch.no_grad():
                fl = flat.detach()
                n_total = onehot.sum(dim=0)
                encode_sum = fl.t() @ onehot
                if _dist_on():
                    dist.all_reduce(n_total)
                    dist.all_reduce(encode_sum)
                self.N.mul_(self.decay).add_(n_total, alpha=1 - self.decay)
                self.z_avg.mul_(self.decay).add_(encode_sum.t(), alpha=1 - self.decay)
                n = self.N.sum()
                weights = (self.N + self.eps) / (n + self.n_codes * self.eps) * n
                self.embeddings.copy_(self.z_avg / weights.unsqueeze(1))
                k_rand = self._random_codes(fl, z.shape[0])
                if self.random_restart:
                    usage = (self.N.view(self.n_codes, 1) >= self.restart_thres).float()
                    self.embeddings.mul_(usage).add_(k_rand * (1 - usage))

        embeddings_st = (embeddings - z).detach() + z  # straight-through
        avg_probs = onehot.mean(dim=0)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7)))
        return {
            "embeddings": embeddings_st,
            "encodings": indices,
            "commitment_loss": commitment_loss,
            "perplexity": perplexity,
        }

    def extra_repr(self) -> str:
        return (
            f"n_codes={self.n_codes}, dim={self.embedding_dim}, decay={self.decay}, "
            f"restart_thres={self.restart_thres}, frozen={self.frozen}"
        )
