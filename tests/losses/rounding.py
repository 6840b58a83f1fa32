"""Rounding-error bounds of the fp32 head + vocabulary loss (pipeline/losses/chunked.py) against the exact
(float64) loss of the same fp32 inputs: the loss value, its CE and divergence parts, and the gradients with
respect to the hidden states and the output embedding. The model of rounding is tests/numerics.py's (U = 2^-24
per basic operation, LIB = 2U per library function, gamma(n - 1) sum |terms| per n-term sum, first order).

Operations counted, per row r of the M rows (logits z [V], temperature T, k top-k ids I, K buckets):

1. logits z = h @ W^T: a D-term dot product, E_z = gamma(D) |h| @ |W|^T; a final-logit scale adds one
   rounding, a soft-cap cap * tanh(z / cap) three (divide, tanh, multiply).
2. lse_tau = m / tau + log(sum_j exp((z_j - m) / tau)), m = max z (tau = 1 for CE, T for the divergence):
   each exponential is off by r_j = (2U |z_j - m| + LIB) / tau + LIB (subtract, divide, exp; or exp then a
   power, which the same r_j covers), the V-term sum by gamma(V - 1), the log by LIB |log s|, the final
   divide and add by U each. The logits' own error enters as sum_j softmax_j E_z_j / tau (lse is 1-Lipschitz;
   the max cancels exactly). CE = m + log s - z_y adds E_z at y and one rounding.
3. the divergence's inputs: student log q_i = z_i / T - lse_T (divide, subtract; or, as a dense log-softmax
   computes it, (z_i / T - m / T) - log s: one more subtraction, U |z_i - m| / T, which the bound adds so
   that it covers both), teacher log p_i = topk_logits_i / T - lse (divide, subtract); renormalize: a
   log-softmax over the k ids. CE likewise takes U |z_y - m| more, for (z_y - m) - log s.
4. the divergence over the K buckets, written as the implementation computes it: each tail as
   -expm1(logsumexp over the k ids) and its log, the bucket weights exp(log), the mixtures
   logaddexp(log p + log a, log q + log b), then w (log w - log m), the K-term sum and the weighted sum of
   the two sides. Every such node gets its local rounding (the list in `_divergence`), and its effect on the
   row's divergence is its exact float64 derivative: so a tail close to 0 (whose log amplifies the
   rounding of 1 - mass) or a divergence that is a small difference of large terms (a KL between close
   distributions: sum |terms| / |KL| large) gets the bound it needs, computed from the case itself.
5. the row sums per chunk (gamma(c - 1)), alpha CE + beta T^2 div (three roundings), the float64 mean, the
   cast to fp32.

The gradient d loss / d z is G = alpha (softmax(z) - onehot(y)) + g_lse softmax(z / T) / T + scatter(I, g_in),
g_in and g_lse the divergence's gradient (fp32 autograd on [M, K]). Its error: the softmax entries' relative
error (their exponential, the V-term sum, the logits' error, the divide and multiply), g's error (the exact
second derivatives of the divergence times every input and node error above, plus gamma(N_BACKWARD) times the
magnitude of its backward paths for the rounding in the backward itself), and three roundings to combine
the terms. Then grad_h = G @ W (V-term dot products: gamma(V) |G| @ |W| plus E_G @ |W|) and grad_W = G^T @ h
summed over all M rows (gamma(M)), both scaled by 1/M (two roundings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.numerics import LIB, U, dot_error, gamma

# Roundings along the longest path of the divergence's backward (bucket tail, a mixture, two sides): the
# logsumexp's softmax weight (subtract, exp = 2, multiply: 4), expm1's derivative (exp, multiply: 3), the log's
# (divide: 1), logaddexp's weight (subtract, exp, multiply: 4), the product w (log w - log m) and the side's
# weight (2), and the sums where paths join (the tail's weight and log, the two sides, the mixture, and at log
# q_i the direct, weight and tail paths: 5). 19, rounded up.
N_BACKWARD = 20


@dataclass
class HeadLossBounds:
    """Bounds on |fp32 result - exact result|: scalars for the values, elementwise for the gradients."""

    loss: float
    ce: float
    kl: float  # of loss_kl = T^2 * mean divergence
    grad_h: torch.Tensor  # [M, D]
    grad_w: torch.Tensor  # [V, D]


def _logits(h, w, transform):
    """(z, E_z) [M, V] float64: the logits and the bound on their fp32 error."""
    z = h.double() @ w.double().T
    err = dot_error(h, w.T)
    if transform is None:
        return z, err
    kind, c = transform
    if kind == "scale":
        z = z * c
        return z, abs(c) * err + U * z.abs()
    assert kind == "softcap", kind
    a = z / c
    ea = err / c + U * a.abs()
    t = torch.tanh(a)
    et = (1 - t * t) * ea + LIB * t.abs()
    z = c * t
    return z, c * et + U * z.abs()


def _normaliser(z, err, tau):
    """(softmax(z / tau), lse, E_lse, r): the exponentials' relative rounding r [M, V] and the bound on
    lse_tau's error [M], its input error included."""
    m = z.amax(-1, keepdim=True)
    d = (z - m).abs()
    q = torch.softmax(z / tau, -1)
    r = (2 * U * d + LIB) / tau + LIB if tau != 1 else U * d + LIB
    log_s = torch.logsumexp((z - m) / tau, -1)
    lse = m.squeeze(-1) / tau + log_s
    e_lse = ((q * err).sum(-1) / tau + (q * r).sum(-1) + gamma(z.shape[-1] - 1) + LIB * log_s.abs()
             + (U * m.squeeze(-1).abs() / tau if tau != 1 else 0) + U * lse.abs())
    return q, lse, e_lse, r


def _logsumexp_rounding(x):
    """Local rounding of torch.logsumexp(x, -1) = mx + log(sum exp(x - mx)) (input exact): [M]."""
    mx = x.amax(-1, keepdim=True)
    pi = torch.softmax(x, -1)
    log_s = torch.logsumexp(x - mx, -1)
    out = mx.squeeze(-1) + log_s
    return ((pi * (U * (x - mx).abs() + LIB)).sum(-1) + gamma(x.shape[-1] - 1) + LIB * log_s.abs()
            + U * out.abs())


def _sides(name: str, args: dict) -> tuple[list[tuple[float, str]], float | None]:
    """([(weight c, side 'p' or 'q')], mixture weight a of p in log(a p + (1 - a) q), or None = no mixture)."""
    if name == "kl":
        return [(1.0, "p")], None
    if name == "reverse_kl":
        return [(1.0, "q")], None
    if name == "skew_kl":
        return [(1.0, "p")], args["lambda"]
    if name == "skew_reverse_kl":
        return [(1.0, "q")], 1.0 - args["lambda"]
    beta = 0.5 if name == "jsd" else args["beta"]
    return [(beta, "p"), (1.0 - beta, "q")], beta


class _Nodes:
    """Zero-valued perturbation leaves added to the divergence's intermediate results, with each one's local
    rounding bound: d divergence / d leaf is that node's exact sensitivity."""

    def __init__(self):
        self.leaves, self.bounds = [], []

    def add(self, x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        eps = torch.zeros_like(x, requires_grad=True)
        self.leaves.append(eps)
        self.bounds.append(bound.detach().expand_as(x))
        return x + eps


def _divergence(name, args, tail, student, lp, nodes: _Nodes):
    """Rows' divergence [M] (float64), from the student's input (bucket: log q over the top-k ids; renormalize:
    z_in / T) and the teacher's log p over the top-k ids, with a rounding node after every fp32 operation of
    pipeline/losses/logits.py's computation. Also returns (p, log p, q, log q) over the buckets."""

    def bucket_side(l_in):
        lm = nodes.add(torch.logsumexp(l_in, -1), _logsumexp_rounding(l_in.detach()))
        t = -torch.expm1(lm)
        assert (t > 1e-5).all(), "a tail below 1e-5 meets the implementation's log floor: the bound assumes none"
        t = nodes.add(t, LIB * t.detach())
        lt = torch.log(t)
        lt = nodes.add(lt, LIB * lt.detach().abs())
        w_in = torch.exp(l_in)
        w_in = nodes.add(w_in, LIB * w_in.detach())
        return torch.cat([w_in, t[:, None]], -1), torch.cat([l_in, lt[:, None]], -1)

    if tail == "bucket":
        p, log_p = bucket_side(lp)
        q, log_q = bucket_side(student)
    else:
        x = student.detach()
        mx = x.amax(-1, keepdim=True)
        log_q = torch.log_softmax(student, -1)
        # (x - mx) - log sum exp(x - mx): the subtractions and the normaliser's own rounding
        log_q = nodes.add(log_q, U * (x - mx).abs() + _logsumexp_rounding(x - mx)[:, None] + U * log_q.detach().abs())
        log_p = lp
        p, q = torch.exp(log_p), torch.exp(log_q)
        p, q = nodes.add(p, LIB * p.detach()), nodes.add(q, LIB * q.detach())
    sides, a = _sides(name, args)
    if a is None:
        log_m = {"p": log_q, "q": log_p}
    else:
        la, lb = math.log(a), math.log1p(-a)
        xa, xb = log_p + la, log_q + lb
        mix = torch.logaddexp(xa, xb)
        mix = nodes.add(mix, U * (xa.detach().abs() + abs(la) + xb.detach().abs() + abs(lb)) + 3 * U
                        + U * mix.detach().abs())
        log_m = {"p": mix, "q": mix}
    parts = []
    for c, side in sides:
        w, lw = (p, log_p) if side == "p" else (q, log_q)
        diff = lw - log_m[side]
        diff = nodes.add(diff, U * diff.detach().abs())
        prod = w * diff
        prod = nodes.add(prod, U * prod.detach().abs())
        s = prod.sum(-1)
        s = nodes.add(s, gamma(prod.shape[-1] - 1) * prod.detach().abs().sum(-1))
        parts.append(c * s)
    if len(parts) == 1:
        total = parts[0]
    else:
        total = parts[0] + parts[1]
        total = nodes.add(total, 2 * U * (parts[0].detach().abs() + parts[1].detach().abs()) + U * total.detach().abs())
    return total, (p.detach(), log_p.detach(), q.detach(), log_q.detach())


def _path_magnitude(tail, p, log_p, q, log_q):
    """[M, k]: a bound on the sum of |products of local derivatives| over the backward paths from the
    divergence to its student input i, for every registered divergence: each bucket contributes at most
    a_b = (p_b + q_b)(2 + |log p_b - log q_b|) to d div / d log q_b (KL: p_b; reverse KL: q_b |log q_b -
    log p_b| + q_b; the skewed and JS forms: the same with the mixture between p and q, times weights <= 1),
    and log q_tail = log(1 - sum_I q) passes q_i / q_tail of it to log q_i (renormalize: log_softmax passes
    q_i sum_b a_b)."""
    a = (p + q) * (2 + (log_p - log_q).abs())
    if tail == "bucket":
        return a[:, :-1] + a[:, -1:] * q[:, :-1] / q[:, -1:]
    return a + q * a.sum(-1, keepdim=True)


def head_loss_bounds(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor | None, ids: torch.Tensor | None,
                     topk_logits: torch.Tensor | None, lse: torch.Tensor | None, divergence: str, args: dict,
                     tail: str, alpha: float, beta: float, temperature: float, chunk: int,
                     transform: tuple[str, float] | None = None, logits: torch.Tensor | None = None
                     ) -> HeadLossBounds:
    """Bounds on the fp32 chunked head loss's error against its exact value, for hidden states h [M, D] and
    output embedding w [V, D] (fp32), as `chunked_head_loss` computes it with `chunk` rows per chunk (CE
    when `targets` is given, the divergence when `ids` is). `transform`: ("scale", s) or ("softcap", cap).
    `logits` [M, V]: given exactly (the bf16 autocast's own), instead of h @ w^T in fp32."""
    T = float(temperature)
    M, V = h.shape[0], w.shape[0]
    if logits is None:
        z, e_z = _logits(h, w, transform)
    else:
        z, e_z = logits.double(), torch.zeros_like(logits, dtype=torch.float64)
    h64, w64 = h.double(), w.double()
    c = min(chunk, M)
    G = torch.zeros_like(z)
    G_abs = torch.zeros_like(z)
    e_G = torch.zeros_like(z)
    ce_sum = div_sum = e_ce = e_div = torch.zeros((), dtype=torch.float64)
    ce_rows = div_rows = torch.zeros(M, dtype=torch.float64)
    if targets is not None:
        q1, lse1, e_lse1, r1 = _normaliser(z, e_z, 1.0)
        y = targets[:, None]
        z_y = z.gather(-1, y).squeeze(-1)
        ce_rows = lse1 - z_y
        e_ce_rows = (e_lse1 + e_z.gather(-1, y).squeeze(-1) + U * (z_y - z.amax(-1)).abs()
                     + U * ce_rows.abs())
        e_ce = e_ce_rows.sum()
        ce_sum = ce_rows.sum()
        onehot = torch.zeros_like(z).scatter_(-1, y, 1.0)
        G += alpha * (q1 - onehot)
        G_abs += alpha * (q1 + onehot)
        rho1 = (e_z + (q1 * e_z).sum(-1, keepdim=True) + r1 + (q1 * r1).sum(-1, keepdim=True)
                + gamma(V - 1) + 2 * U)
        e_G += alpha * q1 * rho1
    if ids is not None:
        coef = beta * T * T
        z_in, e_z_in = z.gather(-1, ids), e_z.gather(-1, ids)
        x = z_in / T
        e_x = e_z_in / T + (U * x.abs() if T != 1 else 0)
        tl = topk_logits.double()
        if tail == "bucket":
            qT, lseT, e_lseT, rT = _normaliser(z, e_z, T)
            student = x - lseT[:, None]
            # and the common shift e_lseT
            e_student = e_x + U * (z_in - z.amax(-1, keepdim=True)).abs() / T + U * student.abs()
            lp = tl / T - lse.double()[:, None]
            e_lp = (U * (tl / T).abs() if T != 1 else 0) + U * lp.abs()
        else:
            student, e_student, e_lseT = x, e_x, None
            y_t = tl / T
            p_in = torch.softmax(y_t, -1)
            e_in = U * y_t.abs() if T != 1 else torch.zeros_like(y_t)
            lp = torch.log_softmax(y_t, -1)
            e_lp = (e_in + (p_in * e_in).sum(-1, keepdim=True) + U * (y_t - y_t.amax(-1, keepdim=True)).abs()
                    + _logsumexp_rounding(y_t - y_t.amax(-1, keepdim=True))[:, None] + U * lp.abs())
        s_leaf = student.detach().requires_grad_(True)
        p_leaf = lp.detach().requires_grad_(True)
        nodes = _Nodes()
        div, (p, log_p, q, log_q) = _divergence(divergence, args, tail, s_leaf, p_leaf, nodes)
        inputs = [s_leaf, p_leaf, *nodes.leaves]
        grads = torch.autograd.grad(div.sum(), inputs, create_graph=True, allow_unused=True)
        g, *grads = [torch.zeros_like(leaf) if d is None else d for d, leaf in zip(grads, inputs)]  # g [M, k]

        def propagate(d_s, d_p, d_nodes):
            """Row bound from derivatives with respect to the student input, the teacher's log p and the nodes."""
            out = (d_s.abs() * e_student).sum(-1) + (d_p.abs() * e_lp).sum(-1)
            if e_lseT is not None:
                out = out + d_s.sum(-1).abs() * e_lseT  # the lse's error shifts every log q_i alike
            for dn, bound in zip(d_nodes, nodes.bounds):
                out = out + (dn.abs() * bound).reshape(M, -1).sum(-1)
            return out

        div_rows = div.detach()
        e_div = propagate(g.detach(), grads[0].detach(), [d.detach() for d in grads[1:]]).sum()
        div_sum = div_rows.sum()
        # g's error: the second derivatives times the same input and node errors, column by column
        e_g = torch.zeros_like(g)
        for i in range(g.shape[-1]):
            d = torch.autograd.grad(g[:, i].sum(), inputs, retain_graph=True, allow_unused=True)
            d = [torch.zeros_like(leaf) if di is None else di for di, leaf in zip(d, inputs)]
            e_g[:, i] = propagate(d[0], d[1], d[2:])
        e_g = e_g + gamma(N_BACKWARD) * _path_magnitude(tail, p, log_p, q, log_q)
        g = g.detach()
        g_in = coef / T * g
        e_g_in = coef / T * e_g + 2 * U * g_in.abs()  # the divide by T, the coefficient
        G.scatter_add_(-1, ids, g_in)
        G_abs.scatter_add_(-1, ids, g_in.abs())
        e_G.scatter_add_(-1, ids, e_g_in)
        if tail == "bucket":
            g_lse = -coef * g.sum(-1)  # [M]
            e_g_lse = coef * (e_g.sum(-1) + gamma(g.shape[-1] - 1) * g.abs().sum(-1)) + U * g_lse.abs()
            t = (g_lse / T)[:, None]
            rhoT = ((e_z + (qT * e_z).sum(-1, keepdim=True)) / T + rT + (qT * rT).sum(-1, keepdim=True)
                    + gamma(V - 1) + 3 * U)
            G += t * qT
            G_abs += t.abs() * qT
            e_G += qT * (t.abs() * rhoT + e_g_lse[:, None] / T)
    e_G = e_G + 3 * U * G_abs  # combining the terms: add, scatter-adds
    if transform is not None and transform[0] == "softcap":
        cap = transform[1]
        z0 = h64 @ w64.T
        t = torch.tanh(z0 / cap)
        e_t = (1 - t * t) * (dot_error(h, w.T) / cap + U * (z0 / cap).abs()) + LIB * t.abs()
        one_minus = 1 - t * t
        e_om = 2 * t.abs() * e_t + U * t * t + U * one_minus
        G, e_G = G * one_minus, e_G * one_minus + G.abs() * e_om
        e_G = e_G + U * G.abs()
    elif transform is not None:
        s = transform[1]
        G, e_G = G * s, abs(s) * e_G + U * (G * s).abs()
    # the value: row sums per chunk, alpha CE + beta T^2 div, float64 mean, fp32 cast
    a_ce, b_div = (alpha if targets is not None else 0.0), (beta * T * T if ids is not None else 0.0)
    sums_abs = a_ce * ce_rows.abs().sum() + b_div * div_rows.abs().sum()
    loss = (a_ce * ce_sum + b_div * div_sum) / M
    e_loss = (a_ce * e_ce + b_div * e_div + gamma(c + 2) * sums_abs) / M + U * abs(loss)
    e_ce_part = (e_ce + gamma(c - 1) * ce_rows.abs().sum()) / M + U * abs(ce_sum / M)
    kl = T * T * div_sum / M
    e_kl = T * T * (e_div + gamma(c - 1) * div_rows.abs().sum()) / M + 2 * U * abs(kl)
    # gradients: V-term (grad_h) and M-term (grad_W) dot products, scaled by 1/M (divide, multiply)
    grad_h = (G @ w64) / M
    e_grad_h = (e_G @ w64.abs() + gamma(V) * (G.abs() @ w64.abs())) / M + 2 * U * grad_h.abs()
    grad_w = (G.T @ h64) / M
    e_grad_w = (e_G.T @ h64.abs() + gamma(M) * (G.abs().T @ h64.abs())) / M + 2 * U * grad_w.abs()
    return HeadLossBounds(float(e_loss), float(e_ce_part), float(e_kl), e_grad_h, e_grad_w)
