"""The per-macrocycle X-ray state: solvent mask -> scales -> F_model -> σA, neighbours, w_A.

Everything here runs outside jit, between minimisations, and returns a new
:class:`jaxrefine.problem.problem.XrayState` with the shapes of the old one (no recompile).
The fit itself is :func:`jaxrefine.problem.fmodel.fit_scales_and_sigma_a`, shared with
``rfactors``, validation and omit maps.
"""
from __future__ import annotations

import concurrent.futures
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core import background
from ..core.cache import call_exported
from ..core.device import on_device
from ..core.restraint_terms import pad_edge_rows
from ..io.mask import mask_grid_shape
from ..io.model import Model
from ..xray.fmodel import f_model
from ..xray.scaling import K_ISO_MAX_NODES, Scales
from ..xray.structure_factors import structure_factors
from ..xray.adp import b_eq
from ..xray.targets import MAX_BINS, SigmaA
from .adp_model import adp_of, refined_tls
from .fmodel import fit_scales_and_sigma_a, model_f_mask, resolution_scale_for
from .neighbours import NONBONDED_SLACK, build_nonbonded, switched_off_waters
from .params import Params, atom_b, atom_occ, atom_xyz
from .problem import Problem, XrayState, pad_reflections
from .riding import scattering_atoms



def cast_floats(tree, dtype):
    """The pytree with every floating-point array leaf cast to ``dtype`` (ints and bools kept)."""
    cdtype = jnp.complex128 if dtype == jnp.float64 else jnp.complex64

    def cast(a):
        if isinstance(a, (np.ndarray, jax.Array)):
            to = dtype if jnp.issubdtype(a.dtype, jnp.floating) else cdtype if jnp.issubdtype(a.dtype, jnp.complexfloating) else None
            if to is not None:
                # numpy input is cast by numpy: on the device each shape was a one-operation program (~60 per run)
                return on_device(a, to) if isinstance(a, np.ndarray) else a.astype(to)
        return a

    return jax.tree_util.tree_map(cast, tree)


# ----------------------------------------------------------------------------- Params -> atoms, F
# Called from host code every macrocycle (statistics, state refits, writers).  On the host in numpy float64 (the
# functions pick numpy for numpy arguments, core.device.array_module): run op by op through JAX these compiled ~700
# single operations on a TLS model (~6 s of a cold 5kzb run); jitted, two programs (0.18 and 0.12 s to compile beside
# the minimiser's in a cold 1va7 run); in numpy ~1 ms a call for 2 000 atoms.
def _model_arrays(params: Params, problem: Problem):
    xyz_cart, _ = atom_xyz(params, problem.maps)
    b = atom_b(params, problem.maps) if problem.adp is None else b_eq(adp_of(params, problem)[2])
    return xyz_cart, b, atom_occ(params, problem.maps)


def _to_host(tree):
    """numpy copies of a pytree's arrays, floating ones as float64."""
    def host(a):
        a = np.asarray(a)
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree_util.tree_map(host, tree)


def _on_host(params: Params, problem: Problem):
    """(params, problem) with what the atoms' arrays are computed from (the parameters, the atom maps, the ADP model,
    the fixed ANISOU shapes) as numpy arrays."""
    return _to_host(params), problem._replace(maps=_to_host(problem.maps), adp=_to_host(problem.adp),
                                              u_shape=_to_host(problem.u_shape))


def current_model_arrays(params: Params, problem: Problem):
    """numpy (xyz_cart (n, 3) Å, b_iso (n,) Å², occ (n,)) for the parameters; b_iso is B_eq of the
    total U where the ADP model is anisotropic or TLS."""
    return tuple(np.asarray(a, float) for a in _model_arrays(*_on_host(params, problem)))


def current_u_aniso(params: Params, problem: Problem):
    """numpy (n, 6) total U (Å²) of every atom for the writers' ANISOU, or None for an isotropic ADP model."""
    return None if problem.adp is None else np.asarray(adp_of(*_on_host(params, problem))[2], float)


def written_adps(model: Model, params: Params, problem: Problem, adp_choice=None) -> dict:
    """``u_aniso`` (n, 6) and ``tls`` for a model written from ``params`` (None where they do not apply).

    ANISOU: the total U of atoms refined anisotropically or in a TLS group (TLS + residual B), or,
    with isotropic refinement, the kept deposited shape + the refined isotropic part.  TLS: the
    groups of ``adp_choice`` (the setup's :class:`AdpChoice`) with the refined tensors.
    """
    out = {"u_aniso": None, "tls": None}
    u_total = current_u_aniso(params, problem)
    if u_total is not None:
        adp = problem.adp
        has = (np.asarray(adp.aniso_index) >= 0) | (np.asarray(adp.tls_group) >= 0) | np.asarray(model.has_aniso, bool)
        out["u_aniso"] = np.where(has[:, None], u_total, 0.0)
    elif problem.u_shape is not None:
        b = current_model_arrays(params, problem)[1]
        u = np.asarray(problem.u_shape, float) + (b / (8 * np.pi**2))[:, None] * np.array([1, 1, 1, 0, 0, 0.0])
        out["u_aniso"] = np.where(np.asarray(model.has_aniso, bool)[:, None], u, 0.0)
    out["tls"] = refined_tls(params, problem, adp_choice)
    return out


def model_of(model: Model, params: Params, problem: Problem, adp_choice=None) -> Model:
    """``model`` (the one the problem was built from) with the coordinates, B, occupancies, ANISOU
    and TLS groups (``adp_choice``: the setup's) of ``params``: the one way from parameters back to
    a :class:`jaxrefine.io.model.Model`, the same arrays the writers put into the refined files."""
    from ..io.build import with_coordinates

    xyz, b, occ = current_model_arrays(params, problem)
    return with_coordinates(model, xyz_cart=xyz, b_iso=b, occ=occ, **written_adps(model, params, problem, adp_choice))


def f_calc_of(params: Params, problem: Problem):
    """(n_refl,) complex F_calc of the parameters (pure JAX)."""
    xyz_cart, xyz_frac = atom_xyz(params, problem.maps)
    b_sf, u_sf, u_total = adp_of(params, problem)
    occ = atom_occ(params, problem.maps)
    if problem.riding is not None:  # riding hydrogens follow the atoms, isotropic with their parent's B_eq
        # (the whole U: anisotropic and TLS parents carry their B in u_sf, and b_sf alone gave their H a B
        # of 0 or of the TLS residual: F_calc of 5kzb with riding H was 14% off in Σ|F|)
        b_parent = b_sf if u_sf is None else b_eq(u_total)
        xyz_cart, b_sf, occ = scattering_atoms(xyz_cart, b_sf, occ, problem.riding, b_parent)
        xyz_frac = xyz_cart @ problem.maps.frac.T
        if u_sf is not None:
            u_sf = jnp.concatenate([u_sf, jnp.zeros((problem.riding.parent.shape[0], 6), u_sf.dtype)])
    return structure_factors(xyz_frac, b_sf, occ, problem.sf, u_sf)


def f_model_of(params: Params, problem: Problem, state: XrayState):
    """(n_refl,) complex F_model of the parameters with the state's mask and scales (pure JAX):
    the one way from parameters to F_model, used by the energy and by every report."""
    return f_model(f_calc_of(params, problem), state.f_mask, problem.xray.s_cart, state.scales)


_f_calc_of_compiled = jax.jit(f_calc_of)


_LAST_F_CALC: list = []  # [(params, problem, F_calc)]: the last F_calc of host code, with the (immutable) objects


def f_calc_of_jit(params: Params, problem: Problem):
    """:func:`f_calc_of` for host code: one compiled program, kept in lowered form in the cache folder
    (:func:`jaxrefine.core.cache.call_exported`; a warm 5kzb run traced it once and lowered it twice: 0.40 s).
    A second call with the very same ``params`` and ``problem`` objects returns the first's F_calc: after each
    macrocycle the water check and then the state's refit ask for it (5orl: ~0.1 s a cycle)."""
    if _LAST_F_CALC and _LAST_F_CALC[0][0] is params and _LAST_F_CALC[0][1] is problem:
        return _LAST_F_CALC[0][2]
    f_calc = call_exported(_f_calc_of_compiled, (params, problem), {}, "f_calc_of")
    immutable = all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(params))  # numpy could change in place
    _LAST_F_CALC[:] = [(params, problem, f_calc)] if immutable else []
    return f_calc


def f_model_on_host(params: Params, problem: Problem, state: XrayState) -> np.ndarray:
    """:func:`f_model_of` for host code: F_calc by its compiled program (the one the state refits and the maps use
    too), the scaling in numpy ((n_refl,) complex numpy array; every caller reads it on the host).  The scaling as a
    program of its own was traced and loaded once more per run (~40 ms of a warm 5e5z run); one program per use
    compiled F_calc three times (cold 5kzb: 0.7-0.8 s each)."""
    return f_model(np.asarray(f_calc_of_jit(params, problem)), np.asarray(state.f_mask), np.asarray(problem.xray.s_cart),
                   jax.tree_util.tree_map(np.asarray, state.scales))


# ----------------------------------------------------------------------------- state updates
def solvent_f_mask(model: Model, refl, xyz_cart, r_probe: float, r_shrink: float, dtype, n_refl: int | None = None):
    """(n_refl,) complex F of the bulk-solvent mask of ``model`` at the coordinates ``xyz_cart`` (Å), at ``refl``'s
    reflections padded to ``n_refl`` as the problem's (:class:`jaxrefine.problem.problem.XrayData`; None: not)."""
    hkl = pad_reflections(refl.hkl, n_refl or refl.n)  # the F of the mask grid at the pads too: one program
    f_mask, _, _ = model_f_mask(model, model.crystal, hkl, refl.d_min, r_probe=r_probe, r_shrink=r_shrink,
                                xyz_cart=xyz_cart)
    return on_device(f_mask, dtype)


# A mask is started ahead (start_f_mask) from this many grid points: 5kzb's 5.5 million (0.17 s a build) beside its B
# block shortened its warm cycles by ~0.6 s in all; 1va7's 0.43 million (~0.03 s) saved less than the thread cost the
# B block's minimisation (warm cycles 5.5 / 5.6 / 5.5 -> 5.6 / 5.4 / 6.2 s, alternating runs).
MASK_AHEAD_MIN_POINTS = 2_000_000


def mask_ahead_pays(setup) -> bool:
    """Whether the solvent mask of ``setup`` is large enough to build it ahead (MASK_AHEAD_MIN_POINTS)."""
    return int(np.prod(mask_grid_shape(setup.model.crystal, setup.refl.d_min))) >= MASK_AHEAD_MIN_POINTS


class PendingMask(NamedTuple):
    """A solvent mask's F being built on a background thread (:func:`start_f_mask`)."""
    xyz: np.ndarray  # (n, 3) Å: the coordinates it is built at
    future: concurrent.futures.Future  # of the (n_refl,) complex F_mask (:func:`solvent_f_mask`)


def start_f_mask(setup, problem: Problem, state: XrayState, xyz) -> PendingMask:
    """Start :func:`solvent_f_mask` at the coordinates ``xyz`` ((n, 3) Å) on a thread of its own, for a later
    :func:`refit_xray_state` at the same coordinates.  The refinement starts it once a macrocycle's coordinates are
    final and only ADPs or occupancies remain to be minimised (at 2.5 Å and worse, where a B block follows the
    coordinate block) and the grid is large enough (:func:`mask_ahead_pays`): gemmi builds the mask on the core the B
    block's program leaves idle (5kzb: 0.17 s a cycle on its 5.5-million-point grid)."""
    solvent = setup.config.solvent
    xyz = np.array(xyz, float)
    future = background.start(lambda: solvent_f_mask(setup.model, setup.refl, xyz, solvent.r_probe, solvent.r_shrink,
                                                     state.f_mask.dtype, n_refl=problem.xray.f_obs.shape[0]), "mask")
    return PendingMask(xyz, future)


def _pending_f_mask(pending: PendingMask | None, xyz):
    """The F_mask of ``pending`` where it was built at exactly ``xyz`` and without error, else None."""
    if pending is None or not np.array_equal(pending.xyz, xyz):
        return None
    try:
        return pending.future.result()
    except Exception:  # noqa: BLE001 - the caller builds it on its own thread and meets the error there
        return None


def update_xray_state(setup, problem: Problem, state: XrayState, params: Params, rebuild_mask: bool = True) -> XrayState:
    """:func:`refit_xray_state`'s new state."""
    return refit_xray_state(setup, problem, state, params, rebuild_mask)[0]


def refit_xray_state(setup, problem: Problem, state: XrayState, params: Params, rebuild_mask: bool = True,
                     pending: PendingMask | None = None):
    """(new :class:`XrayState`, (n_refl,) complex F_model with it): rebuild the solvent mask (F_mask), refit the
    scales on the work set (grid search and joint fit: started from the previous cycle's scales instead, 5orl's
    k_sol/B_sol stayed in the shaken start's basin, 0.367/22 Å² against 0.445/36 Å², and R-free ended 0.007 higher)
    and re-estimate σA.

    Args:
        setup: the :class:`jaxrefine.problem.problem.Setup` (its model and data; its
            ``config.solvent`` radii).
        problem, state, params: the current refinement (``problem`` may differ from
            ``setup.problem``, e.g. waters switched off).
        rebuild_mask: False keeps ``state.f_mask`` (``solvent.update_every``).
        pending: a mask started by :func:`start_f_mask`: used when it was built at the current coordinates (else
            the mask is built here).

    The F_model of the fit is returned for the cycle's statistics, which computed F_calc again (4iid: 0.1 s a cycle).
    """
    x = problem.xray
    f_mask = state.f_mask
    xyz = current_model_arrays(params, problem)[0] if rebuild_mask else None
    # dispatched before the mask is built: XLA computes F_calc on its own thread while gemmi builds the mask on this
    # one (5orl: 60 ms of F_calc beside a 0.15 s mask)
    f_calc = f_calc_of_jit(params, problem)
    ahead = _pending_f_mask(pending, xyz) if rebuild_mask else None
    if ahead is not None:
        f_mask = ahead
    elif rebuild_mask:
        solvent = setup.config.solvent
        f_mask = solvent_f_mask(setup.model, setup.refl, xyz, solvent.r_probe, solvent.r_shrink, state.f_mask.dtype,
                                n_refl=x.f_obs.shape[0])
    scales, f_model, sigma_a = fit_scales_and_sigma_a(x.f_obs, x.sig_f_obs, f_calc, f_mask, x.s_cart, x.work,
                                                      x.sigma_a_use, x.bins, x.centric, x.epsilon, setup.model.crystal,
                                                      resolution_scale=resolution_scale_for(setup.refl.d_min))
    scales, sigma_a = fixed_size_fits(scales, sigma_a)
    return cast_floats(state._replace(f_mask=f_mask, scales=scales, sigma_a=sigma_a), x.s2.dtype), f_model


def fixed_size_fits(scales: Scales, sigma_a: SigmaA):
    """The fits as the state keeps them: k_iso(s²) on K_ISO_MAX_NODES nodes and σA on MAX_BINS bins, whatever the
    data's size (one node per 500 work reflections, one bin per 50 of the σA set, below those caps), so that
    datasets of one model share the compiled programs (the state is their argument).  The extra nodes lie beyond
    the last one, 1 Å⁻² apart, with its value (jnp.interp is constant beyond the ends: k_iso unchanged everywhere);
    the extra bins repeat the last one's D and S and no reflection is in them."""
    if scales.k_iso_s2 is not None:
        nodes, vals = np.asarray(scales.k_iso_s2, float), np.asarray(scales.k_iso, float)
        extra = K_ISO_MAX_NODES - len(nodes)
        if extra > 0:
            nodes = np.concatenate([nodes, nodes[-1] + np.arange(1, extra + 1)])
            vals = np.concatenate([vals, np.repeat(vals[-1:], extra)])
            scales = scales._replace(k_iso_s2=on_device(nodes, scales.k_iso_s2.dtype),
                                     k_iso=on_device(vals, scales.k_iso.dtype))
    extra = MAX_BINS - len(sigma_a.bin_d)
    if extra > 0:
        sigma_a = sigma_a._replace(bin_d=pad_edge_rows(sigma_a.bin_d, MAX_BINS), bin_s=pad_edge_rows(sigma_a.bin_s, MAX_BINS))
    return scales, sigma_a


def xray_state_spec(problem: Problem, nonbonded, d_min: float) -> XrayState:
    """The shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of the state :func:`update_xray_state` fits for
    ``problem``, before it is fitted: enough to compile the programs that take a state while the mask and
    the scales are being computed.  ``nonbonded``: the state's (real) non-bonded list."""
    x = problem.xray
    n, dtype = x.f_obs.shape[0], x.s2.dtype
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    nodes = spec((K_ISO_MAX_NODES,)) if resolution_scale_for(d_min) else None  # fixed_size_fits
    n_bins = MAX_BINS
    return XrayState(
        f_mask=spec((n,), jnp.complex128 if dtype == jnp.float64 else jnp.complex64),
        scales=Scales(k_overall=spec(()), b_aniso=spec((6,)), k_sol=spec(()), b_sol=spec(()), k_iso_s2=nodes, k_iso=nodes),
        sigma_a=SigmaA(d=spec((n,)), s=spec((n,)), bins=spec((n,), np.int32), bin_d=spec((n_bins,)), bin_s=spec((n_bins,))),
        nonbonded=nonbonded, w_a=spec(()),
    )


def moved_beyond(xyz, since, limit: float) -> bool:
    """Whether some atom of ``xyz`` (n, 3) is ``limit`` Å or more from its place in ``since`` (None, or other
    atoms: yes).  The rule for what is rebuilt between macrocycles (neighbour list, mask, riding hydrogens)."""
    if since is None or since.shape != xyz.shape:
        return True
    return float(np.max(np.sum((xyz - since) ** 2, axis=1))) >= limit**2


# The solvent mask is rebuilt once the atoms have moved MASK_RMS_SHIFT Å RMS since the last build, or some atom
# MASK_MAX_SHIFT Å: the flat mask's F (at the data's resolution) follows the envelope of the model, which a few
# atoms moving 0.1-0.3 Å do not change.  4iid (12-million-point mask, 0.6 s a build): cycles 4 and 5 skip their
# builds, warm 27.4 -> 26.3 s, R-free 0.1967 -> 0.1965 (benchmarks/README.md run w; all seven in run y).
MASK_RMS_SHIFT = 0.05
MASK_MAX_SHIFT = 0.5


def mask_moved(xyz, since) -> bool:
    """Whether the solvent mask built at ``since`` ((n, 3) Å; None or other atoms: yes) is out of date for ``xyz``:
    RMS shift >= MASK_RMS_SHIFT or some atom >= MASK_MAX_SHIFT."""
    if moved_beyond(xyz, since, MASK_MAX_SHIFT):  # also None or other atoms
        return True
    return float(np.mean(np.sum((xyz - since) ** 2, axis=1))) >= MASK_RMS_SHIFT**2


def refresh_neighbours(setup, problem: Problem, state: XrayState, params: Params, built_at=None):
    """(state, positions the list was built at): the non-bonded list rebuilt at the current coordinates (same
    capacity), or kept where no atom has moved half the list's slack since ``built_at`` ((n, 3) Å, the positions
    of the last build; None: rebuild).  The list holds every pair within d_min + NONBONDED_SLACK, so while each
    atom has moved less than half the slack no pair can have come within d_min unlisted: the kept list gives
    the same energy as a rebuilt one (a Verlet skin).  4iid's later macrocycles: 0.21 s each saved."""
    xyz, _, _ = current_model_arrays(params, problem)
    if not moved_beyond(xyz, built_at, 0.5 * NONBONDED_SLACK):
        return state, built_at
    nb = build_nonbonded(xyz, problem.restraints, setup.model.crystal, max_pairs=int(state.nonbonded.i.shape[0]),
                         off=switched_off_waters(setup.model, np.asarray(problem.maps.occ0)))
    return state._replace(nonbonded=cast_floats(nb, problem.maps.orth.dtype)), xyz
