"""statprune: magnitude pruning with statistical correction (arXiv 2602.07375, formulas ours).

Per input channel j: mean mu_j, second moment m2_j = E[x_j^2], variance s2_j = m2_j - mu_j^2,
mean absolute value a_j. Pruning row i leaves the error e_i = sum_{j pruned} W_ij x_j with
E[e_i] = sum_pruned W_ij mu_j and Var[e_i] ~ sum_pruned W_ij^2 s2_j. Hence:

score (which weights to drop)
  variance:    |W_ij| * sqrt(s2_j)        the error left once the mean is compensated
  tempered:    |W_ij| * m2_j^(alpha/2)    alpha = 1 is Wanda, alpha = 0 is magnitude, 0 <= alpha <= 2
  first_order: |W_ij| * a_j
  magnitude:   |W_ij|                     (for the "compensation only" ablation)
  obs:         |W_ij| / sqrt([H^-1]_jj)   Optimal Brain Surgeon's saliency w^2 / [H^-1]_jj, square-rooted, with H the
                                          sketched second moments (below): the loss of dropping one weight when the
                                          kept ones take the least-squares update, as SparseGPT ranks a block's
                                          first column; a channel the others can stand in for scores low (needs
                                          the sketch, collected whatever the compensation)

compensation (after the mask, closed form, per output row i)
  mean:   b_i += sum_pruned W_ij mu_j, so E[y_i] is unchanged
  energy: kept W_ij *= gamma_i = (sum_j W_ij^2 v_j / sum_kept W_ij^2 v_j)^(beta/2), v = m2 or s2;
          with v = s2 the bias also absorbs the mean shift the scaling causes
  both:   energy, then the bias restores the dense mean exactly
  measured: after the mask, the next pass through the layer measures, per output row, the
          least-squares affine map from the pruned output y' to the dense output y on (a sample of)
          the calibration tokens: c = Cov(y, y') / Var(y'), b += E[y] - c E[y'] (no bias: c = E[y y'] / E[y'^2])
  measured_scale: the same without the intercept, c = E[y y'] / E[y'^2], for every architecture
  sketch: the kept weights of each row take their least-squares update, delta_K = H_KK^-1 H_KP w_P, with the
          input second moments H = sum x x^T known as their exact diagonal plus a rank-``sketch_rank`` Nystrom
          sketch (sketch.py): the statistics then also hold sum x (x^T Omega) for a fixed probe Omega, tokens x in x k
          to collect and rows x in x k to apply with one solve shared by the rows (rows x in x k^2 with
          ``sketch_per_row``), where SparseGPT's full H costs tokens x in^2 and in^3
  sketch+energy: that update, then the energy restoration (gamma against the updated row)

mask correction (``balance_cycles`` > 0): the mask's mean shift, e_i = sum_pruned W_ij mu_j, is driven
  towards 0 by swapping, per row, a pruned weight whose W_ij mu_j has the sign of e_i (largest
  W_ij mu_j / s2_j^p first: much mean, little variance) against a kept weight of the opposite sign
  with the lowest score (for N:M, the lowest-score kept weight of the same group). A swap is made only
  when it shrinks |e_i|, so each row keeps its count and every N:M group stays valid. This is the
  training-free mask update of DSnoT (Zhang et al., ICLR 2024) on our channel statistics.

defaults (chosen by scripts/ablate.py on the validation split): half the energy restoration (beta 0.5) everywhere,
after the sketched least-squares update at N:M patterns (compensation sketch+energy, sketch_rank 256, one solve
shared by the rows): on the whole N:M default, against the same without it, -9.7% at 4:8 and -16.3% at 2:4 (seed 0;
SparseGPT is then 6.7% and 1.7% ahead, from 18.1% and 21.5%). On the ablation's plainer base (absorbed reallocation
without LSA or residual permutation, energy on every linear) the update alone already beat the whole former default:
4:8 -10.3, -13.9, -6.1% and 2:4 -8.8, -7.3% (seeds 0-2 and 0-1); there, seed 0 at 4:8, each row's own system at
k 32/64/128 gave -2.6/-6.7/-11.2% for rows x in x k^2 work, the shared solve at k 128 -6.3% and at k 512 -8.2%, and
the update at k 64 without the energy restoration 68.79 against 62.89 with it. Whole N:M default, seeds 1-2: 4:8 -15.4
and -8.3%, 2:4 -18.7 and -21.8%. Unstructured keeps energy alone: on its 50% default the update gave 42.21 against
42.12 (seed 0; on the plainer sequential base 42.27). The sketch is collected on every 4th token but never on
fewer than 8,192 (``sketch_every`` unset: sketch.auto_every): on every token its two products are about a fifth of
Wanda's passes at SmolLM2's width. At 64 windows, every 4th token (8,192) against every token moved the whole N:M
default by -0.9, -0.9 and -2.1% at 2:4 and +1.7, -2.2 and -0.1% at 4:8 (seeds 0-2); every 16th (2,048 tokens) by +7.7
and +7.4% (seed 0). The obs score on that default (session 30) moved it by -7.3, +2.5 and +7.2% at 2:4 and -1.8, +2.9 and
+1.5% at 4:8 (seeds 0-2): no gain, so the score stays Wanda's. beta 0.75 after the update (beta was chosen before it)
moved it by -0.6, -3.2 and +0.6% at 2:4 and -2.5, -0.2 and +2.6% at 4:8: within the seeds' spread, so beta stays 0.5.
N:M patterns on full statistics (skip_first_tokens 0: against Wanda over three
calibration seeds, -6.6% at 2:4 and -4.0% at 4:8, every seed; full restoration, beta 1, gave -2.7% at 2:4 and +0.8% at
4:8); unstructured on sink-free statistics (skip_first_tokens 1: against Wanda at 60%, -10.0, -15.5 and -9.1% over
three seeds). At 50% the restoration pays only on the dense model's statistics (below): there, against the same
without it, -0.9, -1.7 and -1.0% over three seeds; with sequential statistics it was +1.9% (seed 0).

energy only outside attention (``energy_targets``): restoring the attention linears' energy does not pay (alone,
it is worse than Wanda: 2:4 149.95 and 60% 117.76 against 144.39 and 116.33, seed 0), restoring the MLP's alone is
better than restoring every linear at 2:4 (-3.1, -1.8, -5.1% over three seeds) and no worse elsewhere (60%, one pass:
-0.3, -1.0, 0.0%; 4:8: +0.9, +1.8, 0.0%).

calibration (unless ``pruning.sequential`` is set): unstructured, on the dense model's activations, one pass per
layer instead of Wanda's two, which halves the pruning time and keeps statprune within a fifth of SparseGPT's cost at
realistic width. From 60% it is also better (against the sequential default at 60%, -4.8, +0.2 and -3.7% over three
seeds); at 50%, with the energy restoration, it is on a par with the sequential default without it (-0.0, +1.4 and
-2.1%; one pass without the restoration: +0.9, +3.1 and -1.1%). Sequential for N:M, where one pass lost (+4.0% at
2:4, +3.0% at 4:8 on average over the same seeds; on the N:M default with its sketched update, session 30, +11.7% and
+3.7%).

channel reallocation (unless ``pruning.reallocation`` is set): at N:M, ``absorbed``, the MLP down projections' input
channels dealt out by score with the gate/up rows reordered to match, and the attention output projections' within
each head with the value rows to match (the checkpoint stays N:M as stored), the order refined by linear sum
assignment (unless ``pruning.lsa`` is set). At 2:4, absorbed alone against the N:M default
without it: -10.6, -7.7 and -8.3% over three validation seeds, and the refinement on top -1.9, -0.1 and -7.8%. At 4:8
absorbed alone lost (+5.5%, seed 0) but with the refinement it gains: -1.5, -4.7 and -0.5% against the stored order.

residual permutation (unless ``pruning.residual_permutation`` is set): at N:M, one order of the residual stream for
q/k/v and gate/up, stored in the checkpoint (permute.py), on top of the above. Against today's default without it
(session 29), on five validation seeds: -0.8, -7.5, -5.5, -1.6 and -3.6% at 2:4; at 4:8 +5.1, -0.7, -1.2, +1.9 and
+2.0%, but on the test benchmark at 4:8 -1.1, -1.9 and -4.5% (seeds 0-2). Neutral at 4:8 over both splits, so it stays
at every N:M. Its order needs a dense pass over 4,096 tokens: from 512 tokens, or from the norms' weights and the
embeddings with no pass, it kept little of the gain at 2:4 and lost at 4:8.

allocation inside each layer (unless ``pruning.allocation`` is set): unstructured, ``energy`` (allocation.py): each
linear's sparsity within +-0.1 of its layer's, chosen so the shares of output energy the layer's linears lose add up to
the least. At 50% against uniform: -2.6, -4.5 and -3.3% over three validation seeds (chosen on an earlier run: spread
0.1 -3.1, -4.9, -3.7%; 0.05 -3.9, +2.3%; 0.2 -1.7, -0.9%; 0.35 +1.1%, seed 0); at 60%, -7.8, -6.7 and -8.1%.

OWL's outlier threshold (unless ``pruning.owl.m`` is set): M 7, not the paper's 5. At 70%, one pass, M 5 moved
statprune against uniform by -6.3, +31.7 and -5.1% over three validation seeds; M 7 by -18.8, +2.2 and -13.8%, better
than M 5 on every seed (and on the test benchmark -13.9, -0.9 and -10.4%, where M 5 gave +0.8, +61.1 and -8.1%).

robust statistics: ``skip_first_tokens`` leaves the first positions of every window
out of the statistics. The first token of a window acts as an attention sink and carries massive
activations in a few channels (e.g. a second moment 13x the rest in SmolLM2's last down_proj),
which would otherwise decide those channels' scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from statprune_cli.errors import ConfigError
from statprune_cli.layers import name_matches
from statprune_cli.methods.base import Method, Options, Target
from statprune_cli.sketch import inverse_diagonal, least_squares_update, nystrom, probe
from statprune_cli.stats import ChannelStats

SKETCH_DAMP = 0.01  # SparseGPT's percdamp: the least-squares update's H gets this share of its mean diagonal added
SCORES = ("variance", "tempered", "first_order", "magnitude", "obs")
COMPENSATIONS = ("none", "mean", "energy", "both", "measured", "measured_scale", "sketch", "sketch+energy")


@dataclass
class StatPruneOptions(Options):
    score: str = "tempered"
    alpha: float = 1.0
    compensation: str | None = None  # None: sketch+energy for N:M patterns, energy for unstructured (measured: docstring)
    beta: float = 0.5  # half the energy back: between least squares (no scaling) and full restoration
    energy_stat: str = "m2"
    measure_tokens: int = 256
    sketch_rank: int = 256
    sketch_every: int | None = None  # None: every 4th token, never fewer than 8,192 (sketch.auto_every; measured)
    sketch_per_row: bool = False  # each row's own k x k system (exact under the sketch: rows x in x k^2 work), else one shared
    skip_first_tokens: int | None = None  # None: 0 for N:M patterns, 1 for unstructured
    balance_cycles: int = 0
    balance_var_power: float = 1.0
    balance_targets: list[str] = field(default_factory=lambda: ["re:.*"])
    # the linears whose energy is restored; default: every one outside attention (no "att" in its name; measured)
    energy_targets: list[str] = field(default_factory=lambda: ["re:(?!.*att)"])

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ConfigError("pruning.options.score", f"expected one of {', '.join(SCORES)}, got {self.score!r}")
        if self.compensation is not None and self.compensation not in COMPENSATIONS:
            raise ConfigError("pruning.options.compensation", f"expected one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        if not 0.0 <= self.alpha <= 2.0:  # above 1 the activations weigh more than in Wanda
            raise ConfigError("pruning.options.alpha", f"expected a number in [0, 2], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("pruning.options.beta", f"expected a number in [0, 1], got {self.beta}")
        if self.skip_first_tokens is not None and self.skip_first_tokens < 0:
            raise ConfigError("pruning.options.skip_first_tokens", f"expected an integer >= 0, got {self.skip_first_tokens}")
        if self.sketch_rank < 1:
            raise ConfigError("pruning.options.sketch_rank", f"expected an integer >= 1, got {self.sketch_rank}")
        if self.sketch_every is not None and self.sketch_every < 1:
            raise ConfigError("pruning.options.sketch_every", f"expected an integer >= 1, got {self.sketch_every}")
        if self.measure_tokens < 1:
            raise ConfigError("pruning.options.measure_tokens", f"expected an integer >= 1, got {self.measure_tokens}")
        if self.balance_cycles < 0:
            raise ConfigError("pruning.options.balance_cycles", f"expected an integer >= 0, got {self.balance_cycles}")
        if self.balance_var_power < 0:
            raise ConfigError("pruning.options.balance_var_power", f"expected a number >= 0, got {self.balance_var_power}")
        if self.energy_stat not in ("m2", "s2"):
            raise ConfigError("pruning.options.energy_stat", f"expected 'm2' or 's2', got {self.energy_stat!r}")


class StatPrune(Method):
    name = "statprune"
    Options = StatPruneOptions

    def __init__(self, options: StatPruneOptions | None = None, nm: tuple[int, int] | None = None) -> None:
        o = options if options is not None else StatPruneOptions()
        self.options = replace(o, skip_first_tokens=(0 if nm else 1) if o.skip_first_tokens is None else o.skip_first_tokens,
                               compensation=("sketch+energy" if nm else "energy") if o.compensation is None else o.compensation)
        self.nm = nm

    @property
    def sequential(self) -> bool:
        return self.nm is not None  # measured (scripts/ablate.py): see the module's docstring

    @property
    def allocation(self) -> str:
        return "energy" if self.nm is None else "uniform"  # measured (scripts/ablate.py): see the module's docstring

    @property
    def owl_m(self) -> float:
        return 7.0  # measured (scripts/ablate.py): see the module's docstring

    @property
    def reallocation(self) -> bool | str:
        return "absorbed" if self.nm else False  # measured (scripts/ablate.py): see the module's docstring

    @property
    def residual_permutation(self) -> bool:
        return self.nm is not None  # measured (scripts/ablate.py): see the module's docstring

    @property
    def lsa(self) -> bool:
        return True  # measured (scripts/ablate.py): see the module's docstring; applies only where the run reallocates

    @property
    def wants_bias(self) -> bool:
        o = self.options
        return o.compensation in ("mean", "both", "measured") or (o.compensation == "energy" and o.energy_stat == "s2")

    @property
    def skip_first_tokens(self) -> int:
        return self.options.skip_first_tokens

    @property
    def sketch_rank(self) -> int:
        o = self.options
        return o.sketch_rank if o.compensation.startswith("sketch") or o.score == "obs" else 0

    @property
    def sketch_every(self) -> int | None:
        return self.options.sketch_every

    @property
    def needs_output_pass(self) -> bool:
        return self.options.compensation in ("measured", "measured_scale")

    def refiner(self, linear: nn.Linear, dense: torch.Tensor, stats: ChannelStats | None) -> MeasuredCompensation | None:
        if not self.needs_output_pass:
            return None
        return MeasuredCompensation(linear, dense, self.options.measure_tokens, self.options.compensation == "measured")

    def score(self, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
        assert stats is not None
        o = self.options
        act = {
            "variance": lambda: stats.var.sqrt(),
            "tempered": lambda: stats.m2.pow(o.alpha / 2),
            "first_order": lambda: stats.mean_abs,
            "magnitude": lambda: None,
            "obs": lambda: obs_scale(stats, o.sketch_rank),
        }[o.score]()
        if act is None:
            return weight.abs()
        return weight.abs().mul_(act.to(weight.device, torch.float32))  # in place: no second matrix-sized temporary

    def select(self, weight: torch.Tensor, score: torch.Tensor, stats: ChannelStats | None,
               target: Target) -> tuple[torch.Tensor, dict[str, Any]]:
        mask, info = super().select(weight, score, stats, target)
        if self.options.balance_cycles and any(name_matches(p, target.name) for p in self.options.balance_targets):
            assert stats is not None
            mask = balance_mean(weight, mask, score, stats, self.options.balance_cycles, target.nm, self.options.balance_var_power)
        return mask, info

    def update(self, linear: nn.Linear, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats | None,
               target: Target) -> dict[str, Any]:
        assert stats is not None
        o = self.options
        if o.compensation in ("none", "measured", "measured_scale"):  # only the mask here (measured: after the next pass)
            return super().update(linear, weight, mask, stats, target)
        # One float64 matrix at a time (the squared weights), the rest in place in ``weight``: a 11008 x 4096 linear's
        # float64 copies are 360 MB each, and the former five of them cost as much as a tenth of the layer's passes.
        mu = stats.mean.to(weight.device) if self.wants_bias and linear.bias is not None else None
        dense_mean = weight.double() @ mu if mu is not None and o.compensation in ("mean", "both") else None
        info: dict[str, Any] = {}
        energy = (o.compensation in ("energy", "both", "sketch+energy") and o.beta > 0
                  and any(name_matches(p, target.name) for p in o.energy_targets))
        if energy:
            v = (stats.m2 if o.energy_stat == "m2" else stats.var).to(weight.device)
            dense_energy = weight.double().square_() @ v
        if self.sketch_rank:
            u, lam = sketch_factors(stats, o.sketch_rank, weight.device)
            least_squares_update(weight, mask, stats.sumsq.to(weight.device), u, lam, SKETCH_DAMP, o.sketch_per_row)
            info["sketch_rank"] = o.sketch_rank
        else:
            weight.masked_fill_(mask, 0.0)
        gamma = None
        if energy:
            kept_energy = weight.double().square_() @ v
            ratio = torch.where(kept_energy > 0, dense_energy / kept_energy.clamp_min(1e-300), torch.ones_like(kept_energy))
            gamma = ratio.pow(o.beta / 2)
            info["gamma_mean"] = float(gamma.mean())
            weight.mul_(gamma.to(weight.dtype)[:, None])
        linear.weight.data.copy_(weight)  # a no-op for float32 weights: ``weight`` is their storage
        if self.wants_bias and not self.needs_output_pass:
            if mu is None:
                info["mean_compensation"] = "skipped: this architecture cannot take a bias here"
            else:
                new_mean = weight.double() @ mu
                # mean/both: back to the dense mean; energy on s2: only the shift the scaling caused (kept = new / gamma)
                reference = dense_mean if dense_mean is not None else (new_mean / gamma if gamma is not None else new_mean)
                shift = reference - new_mean
                linear.bias.data.add_(shift.to(linear.bias.dtype))
                info["bias_shift_abs_mean"] = float(shift.abs().mean())
        return info


class MeasuredCompensation:
    """Least-squares per-row correction of a pruned linear, from its dense and pruned outputs on the same inputs.

    Only ``tokens`` rows of each batch are used: a per-row scalar needs few samples, and the two
    extra matmuls on a sample keep the cost close to Wanda's.
    """

    def __init__(self, linear: nn.Linear, dense: torch.Tensor, tokens: int, intercept: bool = True) -> None:
        self.linear, self.dense, self.tokens = linear, dense, tokens
        self.bias0 = linear.bias.detach().double().clone() if intercept and linear.bias is not None else None
        z = torch.zeros(linear.out_features, dtype=torch.float64, device=dense.device)
        self.s_yp, self.s_pp, self.s_y, self.s_p, self.n = z.clone(), z.clone(), z.clone(), z.clone(), 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        x = x[:: max(1, x.shape[0] // self.tokens)][: self.tokens].float()
        y = (x @ self.dense.T).double()
        p = (x @ self.linear.weight.detach().float().T).double()
        self.s_yp += (y * p).sum(0)
        self.s_pp += (p * p).sum(0)
        self.s_y += y.sum(0)
        self.s_p += p.sum(0)
        self.n += x.shape[0]

    def apply(self) -> dict[str, Any]:
        n = self.n
        if self.bias0 is not None:
            cov = self.s_yp / n - self.s_y * self.s_p / n**2
            var = self.s_pp / n - (self.s_p / n) ** 2
        else:
            cov, var = self.s_yp, self.s_pp
        c = torch.where(var > 0, cov / var.clamp_min(1e-300), torch.ones_like(var)).clamp(0.5, 2.0)
        w = self.linear.weight
        w.data.copy_((w.data.double() * c[:, None]).to(w.dtype))
        if self.bias0 is not None:
            self.linear.bias.data.copy_((self.bias0 + self.s_y / n - c * self.s_p / n).to(self.linear.bias.dtype))
        self.dense = None  # free the dense copy as soon as the layer is done
        return {"scale_mean": float(c.mean()), "measured_tokens": n}


def balance_mean(
    weight: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, stats: ChannelStats, cycles: int,
    nm: tuple[int, int] | None = None, var_power: float = 1.0,
) -> torch.Tensor:
    """Swap pruned and kept weights row by row so the pruned row's mean output moves back to the dense one.

    At most ``cycles`` candidate regrowths per row (from the ``cycles`` best of each sign); each row
    keeps its number of pruned weights. Returns a new mask (True = pruned).
    """
    mask = mask.clone()
    rows, cols = weight.shape
    d = weight.double() * stats.mean.to(weight.device)  # each weight's share of its row's mean output
    var = stats.var.to(weight.device).clamp_min(1e-12)
    err = (d * mask).sum(1)  # E[y_dense - y_pruned] per row
    k = min(cycles, cols)
    ninf = float("-inf")
    ratio = d / var.pow(var_power)
    grow = [torch.topk(torch.where(mask & (d > 0), ratio, ninf), k, dim=1),  # used while err > 0
            torch.topk(torch.where(mask & (d < 0), -ratio, ninf), k, dim=1)]  # used while err <= 0
    score = score.double()
    if nm is None:
        drop = [torch.topk(torch.where(~mask & (d < 0), -score, ninf), k, dim=1),  # while err > 0
                torch.topk(torch.where(~mask & (d > 0), -score, ninf), k, dim=1)]  # while err <= 0
    else:
        keep_score = torch.where(mask, float("inf"), score)  # pruned (and regrown) weights are not candidates
        offsets = torch.arange(nm[1], device=weight.device)
    # per row, the next candidate in grow[0], grow[1], drop[0], drop[1] (index 0: while err > 0, 1: while err <= 0)
    ptr = torch.zeros(rows, 4, dtype=torch.long, device=weight.device)
    active = torch.ones(rows, dtype=torch.bool, device=weight.device)
    row = torch.arange(rows, device=weight.device)

    def pick(lists: list, first: int, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = ptr[row, first + side].clamp_max(k - 1)[:, None]
        vals = torch.where(side[:, None] == 0, lists[0].values.gather(1, p), lists[1].values.gather(1, p))[:, 0]
        idx = torch.where(side[:, None] == 0, lists[0].indices.gather(1, p), lists[1].indices.gather(1, p))[:, 0]
        return idx, (vals > ninf) & (ptr[row, first + side] < k)

    for _ in range(cycles):
        side = (err <= 0).long()  # 0: the pruned part of the row adds to the mean, regrow a positive share
        g, g_ok = pick(grow, 0, side)
        if nm is None:
            p, p_ok = pick(drop, 2, side)
        else:
            group = (g - g % nm[1])[:, None] + offsets
            p = group.gather(1, keep_score.gather(1, group).argmin(1, keepdim=True))[:, 0]
            p_ok = torch.ones_like(g_ok)
        active &= g_ok & p_ok
        if not active.any():
            break
        new_err = err + d[row, p] - d[row, g]
        swap = active & (new_err.abs() < err.abs())
        r = row[swap]
        mask[r, g[swap]] = False
        mask[r, p[swap]] = True
        err = torch.where(swap, new_err, err)
        if nm is not None:
            keep_score[r, p[swap]] = float("inf")
            keep_score[r, g[swap]] = float("inf")
        ptr[row[active], side[active]] += 1  # a candidate that would overshoot is passed over
        ptr[r, 2 + side[swap]] += 1
    return mask


def sketch_factors(stats: ChannelStats, k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U and lam of the sketched input Hessian, from its ``k``-probe sketch and the probe it was made with, on
    ``device`` (default: the sketch's)."""
    y = stats.probed(k)
    assert y is not None  # the engine collects the sketch this method asks for (``sketch_rank``)
    device = y.device if device is None else device
    return nystrom(y.to(device), probe(y.shape[0], y.shape[1], device))


def obs_scale(stats: ChannelStats, k: int) -> torch.Tensor:
    """1 / sqrt([H^-1]_jj) under the sketched H, the column scale of the ``obs`` score (float32, on the statistics'
    device)."""
    u, lam = sketch_factors(stats, k)
    return inverse_diagonal(stats.sumsq.to(u.device), u, lam, SKETCH_DAMP).rsqrt().float()
