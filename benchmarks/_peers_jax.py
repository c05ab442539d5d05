"""The jitted JAX references of ``benchmarks/peers.py``: a sequential ``lax.scan`` and a DEER-style
Newton solve (full per-step Jacobians, the affine recurrence by ``jax.lax.associative_scan``).

Import only after ``XLA_FLAGS`` has been set (``peers.py`` sets one intra-op thread); never imported
by the test suite.

The Newton solve mirrors ``deeppcr.solve(config=Config(jacobian="full"))`` without windows or a
sequential finish: start from ``x0`` repeated, and while some step's residual
``r_l = f(z_{l-1}) - z_l`` fails ``|r_l| <= atol + rtol |z_l|`` (max norm per sample, our float32
defaults: rtol 1e-6, atol the smallest normal number) and fewer than ``max_iter`` updates ran,
solve ``d_l = J_l d_{l-1} + r_l`` by an associative scan and set ``z += d``. Its gradient
(``jax.custom_vjp``, as DEER does) is one reverse associative scan with transposed Jacobians plus one
batched VJP of the step for the parameters and ``x0`` -- no Newton loop, as our full-mode adjoint.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

RTOL, ATOL = 1e-6, float(np.finfo(np.float32).tiny)


# ------------------------------------------------------------------------------------------ steps
def mlp_step(z, W, b):
    """One tanh-MLP layer on a batch: z (B, w), W (w, w), b (w,)."""
    return jnp.tanh(z @ W.T + b)


def mlp_jac(z, W, b):
    """Analytic Jacobian per sample, (B, w, w): diag(1 - y^2) W."""
    y = mlp_step(z, W, b)
    return (1.0 - y * y)[:, :, None] * W[None]


def gru_cell(h, x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRUCell on one sample (h (n,), x (m,)); weights in torch's layout (gates r, z, n)."""
    gi = w_ih @ x + b_ih
    gh = w_hh @ h + b_hh
    i_r, i_z, i_n = jnp.split(gi, 3)
    h_r, h_z, h_n = jnp.split(gh, 3)
    r = jax.nn.sigmoid(i_r + h_r)
    z = jax.nn.sigmoid(i_z + h_z)
    n = jnp.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h


def gru_step(h, x, w_ih, w_hh, b_ih, b_hh):
    """GRUCell on a batch: h (B, n), x (B, m)."""
    return jax.vmap(gru_cell, in_axes=(0, 0, None, None, None, None))(h, x, w_ih, w_hh, b_ih, b_hh)


def gru_jac(h, x, w_ih, w_hh, b_ih, b_hh):
    """Per-sample Jacobian d h' / d h by forward mode, (B, n, n)."""
    return jax.vmap(jax.jacfwd(gru_cell), in_axes=(0, 0, None, None, None, None))(h, x, w_ih, w_hh, b_ih, b_hh)


# A problem: step(z, *per_step_l, *shared) and jac(...) of the same arguments; per-step arrays carry a
# leading L axis, shared ones do not.
PROBLEMS = {"mlp": (mlp_step, mlp_jac, 2, 0), "gru": (gru_step, gru_jac, 1, 4)}  # (step, jac, #per_step, #shared)


# ------------------------------------------------------------------------------------- sequential
def sequential(kind, x0, per_step, shared):
    """The chain by ``lax.scan``; returns the final state."""
    step = PROBLEMS[kind][0]

    def body(z, p):
        return step(z, *p, *shared), None

    zL, _ = jax.lax.scan(body, x0, per_step)
    return zL


# ----------------------------------------------------------------------------------------- Newton
def _over_steps(fn, zprev, per_step, shared):
    """fn at every step at once: zprev (L, B, n), per-step arrays (L, ...)."""
    return jax.vmap(lambda z, *p: fn(z, *p, *shared))(zprev, *per_step)


def _combine(e1, e2):
    """e1 then e2 (e1 covers the earlier steps): x -> A2 (A1 x + b1) + b2."""
    A1, b1 = e1
    A2, b2 = e2
    return jnp.matmul(A2, A1), jnp.einsum("...ij,...j->...i", A2, b1) + b2


def affine_scan(A, b):
    """d_l = A_l d_{l-1} + b_l, d_0 = 0, for all l by ``lax.associative_scan``; A (L, B, n, n), b (L, B, n)."""
    return jax.lax.associative_scan(_combine, (A, b))[1]


def _converged(r, z):
    err = jnp.max(jnp.abs(r), axis=-1)
    tol = ATOL + RTOL * jnp.max(jnp.abs(z), axis=-1)
    return jnp.all(err <= tol)


def newton(kind, x0, per_step, shared, max_iter):
    """DEER-style Newton; returns (states (L, B, n), updates made, converged)."""
    step, jac, _, _ = PROBLEMS[kind]
    L = per_step[0].shape[0]

    def linearise(z):
        zprev = jnp.concatenate([x0[None], z[:-1]], axis=0)
        fz = _over_steps(step, zprev, per_step, shared)
        J = _over_steps(jac, zprev, per_step, shared)
        return fz - z, J

    def cond(carry):
        z, r, J, k = carry
        return jnp.logical_and(k < max_iter, jnp.logical_not(_converged(r, z)))

    def body(carry):
        z, r, J, k = carry
        z = z + affine_scan(J, r)
        r, J = linearise(z)
        return z, r, J, k + 1

    z = jnp.broadcast_to(x0, (L, *x0.shape))
    r, J = linearise(z)
    z, r, J, k = jax.lax.while_loop(cond, body, (z, r, J, jnp.int32(0)))
    return z, k, _converged(r, z)


@partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def newton_states(kind, x0, per_step, shared, max_iter):
    return newton(kind, x0, per_step, shared, max_iter)[0]


def _newton_fwd(kind, x0, per_step, shared, max_iter):
    z = newton(kind, x0, per_step, shared, max_iter)[0]
    return z, (x0, per_step, shared, z)


def _newton_bwd(kind, max_iter, saved, g):
    """a_l = g_l + J_{l+1}^T a_{l+1} by one reverse associative scan; then one batched VJP of the step."""
    step, jac, _, _ = PROBLEMS[kind]
    x0, per_step, shared, z = saved
    zprev = jnp.concatenate([x0[None], z[:-1]], axis=0)
    J = _over_steps(jac, zprev, per_step, shared)
    JT = jnp.swapaxes(J, -1, -2)
    M = jnp.concatenate([JT[1:], jnp.zeros_like(JT[:1])], axis=0)  # a_l = M_l a_{l+1} + g_l, M_L = 0
    a = jnp.flip(affine_scan(jnp.flip(M, 0), jnp.flip(g, 0)), 0)
    _, vjp = jax.vjp(lambda zp, ps, sh: _over_steps(step, zp, ps, sh), zprev, per_step, shared)
    dzprev, dps, dsh = vjp(a)
    return dzprev[0], dps, dsh


newton_states.defvjp(_newton_fwd, _newton_bwd)


# ------------------------------------------------------------------------------------ entry points
def build(kind: str, variant: str, train: bool, max_iter: int):
    """A function of (x0, per_step, shared) for jit: the final state (forward), or, when ``train``,
    the gradients of ``sum(z_L)`` w.r.t. x0, the per-step and the shared arrays. For "newton"
    forward it also returns (updates made, converged)."""
    if variant == "scan":
        def final(x0, ps, sh):
            return sequential(kind, x0, ps, sh)
    elif train:
        def final(x0, ps, sh):
            return newton_states(kind, x0, ps, sh, max_iter)[-1]
    else:
        def fwd(x0, ps, sh):
            z, k, ok = newton(kind, x0, ps, sh, max_iter)
            return z[-1], k, ok
        return fwd
    if train:
        return jax.grad(lambda x0, ps, sh: jnp.sum(final(x0, ps, sh)), argnums=(0, 1, 2))
    return final


def compile_fn(fn, *args):
    """``jax.jit(fn).lower(*args).compile()``: the ahead-of-time executable (its time is the jit cost)."""
    return jax.jit(fn).lower(*args).compile()


def block(out):
    return jax.block_until_ready(out)


def to_jax(t):
    """A torch tensor (CPU) as a float32 JAX array."""
    return jnp.asarray(t.detach().cpu().numpy())
