"""Fused molecular dynamics: compiled HMC and FHMC trajectories (torch.compile).

Eager torch pays one pass over memory and one dispatch per elementwise operation; a
phi^4 force plus a momentum kick is about 15 of them.  :func:`compile_trajectory` hands
work to ``torch.compile`` (the inductor backend, which runs on CPU with the system's C++
compiler and on CUDA with Triton, from the same source):

- HMC (:class:`~hpcflow.action.Phi4Action`): the whole trajectory of an integrator
  (:mod:`hpcflow.hmc`), followed by the action at its end point, compiled.  The integrator
  and the action are the ordinary ones, traced, so there is one source of truth for the
  MD; the step size and the number of steps are constants of the graph.  Two layouts, the
  same numbers bit for bit (:data:`LAYOUTS`, :func:`default_layout`):

  - *batch-major*: the MD as one graph on the [B, L0, L1] batch (GPUs; CPU batches of
    fewer than :data:`SITE_MAJOR_MIN_BATCH` chains).  On a CPU its rolls along the
    contiguous x1 are gathered lane by lane with index arithmetic;
  - *site-major* (CPU, the default from 16 chains): the fields transposed to [L0, L1, B]
    in one graph, the MD there in a second (every roll moves rows of B contiguous numbers),
    transposed back in a third (:func:`site_major_parts`).  In the bench's run
    (results/bench-cpu.json, ``other_layout``) the batch-major step took 1.13 to 1.41
    times as long at B >= 64.

  Both layouts end with the same graphs on the batch-major end point (:func:`end_parts`):
  the action, or the action and the Metropolis test, so that S and dH are computed alike
  whatever the layout (:func:`hmc_trajectory`).
  The Metropolis test (kinetic energies, dH, accept decisions, selection:
  :func:`hpcflow.hmc.metropolis`) is fused into the graph too, as the step that hmc_step
  then calls (``step``), in both layouts (bit for bit the same in both; fused in one and
  eager in the other, dH would differ by rounding between the layouts, so between rank
  counts).  Measured in the same rounds (results/bench-cpu.json, ``fused_metropolis``),
  eager / fused step seconds were 1.05 to 1.18 site-major (B = 64 ... 1024) and 1.30, 1.14
  batch-major (B = 1).  ``metropolis=False`` leaves the test eager.
- FHMC (:class:`~hpcflow.action.FlowedAction` over a Phi4Action, with a flow of the paper's
  family without hidden channels, e.g. the minimal model): the flowed force F~(z) with the
  momentum kick before and the drift after it (:meth:`StencilFlow.kick_drift`) is one
  compiled graph, called once per force of the integrator's schedule
  (:meth:`hpcflow.hmc.Integrator.schedule`) but the last, which is the kick with F~ and
  S~ from one pass of the generator (:meth:`StencilFlow.kick_action`).  The fields stay
  in the checkerboard halves for the whole trajectory, and S~ is computed once, at the
  end point.  The frozen evaluator's sparse matrices are not traceable by inductor, so
  :class:`StencilFlow` writes the same formulas with gathers (k^2 / 2 per site, the nonzeros
  of the sparse rows), compiled with :data:`FLOW_INDUCTOR`.  Compiling one force, not the
  unrolled trajectory of 11 of them, keeps the compilation to small graphs (an unrolled
  graph of 2 or 5 kick-drifts, tried once, was no faster per force and compiled 2 to 4
  times longer).

The compiled functions give the eager numbers up to rounding (HMC: the same operations in
the same order, phi and pi bit-identical on CPU, S and dH to a few 1e-14 (inductor sums in
another order); FHMC: the same formulas in another order,
about 1e-14; both tested to 1e-12), so chains stay independent of the rank count and resume
exactly.  On a CPU an HMC batch of more than :data:`CPU_CHUNK_ABOVE` sites (batch-major;
site-major: :data:`CPU_CHUNK_SITES`) runs in chunks of replicas that stay in cache for
the whole trajectory (:func:`chunked`; bit-identical to the unchunked call).  Shapes are static: a process compiles once per batch shape (a
production rank has one; a chunked batch, the chunk's), and the first call pays the
compilation (tens of seconds on CPU; inductor caches it on disk,
``TORCHINDUCTOR_CACHE_DIR``).  Other actions (flows with hidden channels, other targets)
stay eager.
"""

from __future__ import annotations

from typing import Callable

import torch

from .action import FlowedAction, Phi4Action
from .hmc import metropolis_info

MODES = ("auto", "on", "off")


class CompileUnavailable(RuntimeError):
    """torch.compile cannot be used here (no C++ compiler, unsupported platform, ...)."""


def _flowed_reason(action) -> str | None:
    """Why a FlowedAction is not fused (None: it is)."""
    if type(action.target) is not Phi4Action:
        return f"its target is a {type(action.target).__name__}, not a Phi4Action"
    flow = action.flow
    if not hasattr(flow, "couplings") or not hasattr(flow, "scale") or not len(flow.couplings):
        return f"its flow is a {type(flow).__name__} without coupling layers"
    if any(c.hidden for c in flow.couplings):
        return f"its flow has hidden channels {tuple(flow.couplings[0].hidden)}"
    return None


def compilable(action) -> bool:
    """Whether :func:`compile_trajectory` fuses this action: a Phi4Action, or a FlowedAction
    over one whose flow has no hidden channels."""
    if type(action) is Phi4Action:
        return True
    return type(action) is FlowedAction and _flowed_reason(action) is None


def eager_trajectory(action, integrator, length: float, n_steps: int) -> Callable:
    """(phi, pi) -> (phi', pi', S(phi')): the trajectory as hmc_step computes it eagerly."""
    eps = length / n_steps

    def trajectory(phi, pi):
        phi_new, pi_new = integrator(phi, pi, action.force, eps, n_steps)
        return phi_new, pi_new, action.action(phi_new)

    return trajectory


def eager_step(action, integrator, length: float, n_steps: int) -> Callable:
    """(phi, S, pi, log_u) -> (phi_out, S_out, dH, accepted, probability, divergent): the
    trajectory of :func:`eager_trajectory` and the Metropolis test with the trajectory's
    info (:func:`hpcflow.hmc.metropolis_info`), what hmc_step computes eagerly; the reference
    of the compiled step (:func:`hmc_trajectory`)."""
    trajectory = eager_trajectory(action, integrator, length, n_steps)

    def step(phi, S, pi, log_u):
        return metropolis_info(phi, S, pi, *trajectory(phi, pi), log_u)

    return step


def sites_first(phi: torch.Tensor, pi: torch.Tensor):
    """[B, L0, L1] -> [L0, L1, B] (contiguous), for phi and pi: the site-major layout of
    the compiled CPU trajectory (:func:`site_major_parts`)."""
    return phi.permute(1, 2, 0).contiguous(), pi.permute(1, 2, 0).contiguous()


def site_major_parts(action, integrator, length: float, n_steps: int):
    """The MD of a :class:`~hpcflow.action.Phi4Action` trajectory on site-major fields, in
    two functions for two compiled graphs (after :func:`sites_first`):

    - ``md(p, q)``: the integrator on [L0, L1, B] fields with ``action.force(., dims=(0, 1))``;
      every roll moves whole rows of B contiguous numbers, so the loops over the batch
      vectorise without the per-element index arithmetic of a roll along the contiguous x1
      of a [B, L0, L1] batch (inductor gathers those lanes one by one);
    - ``batch_first(p, q)`` -> (phi', pi'), back to contiguous [B, L0, L1].

    Each site's arithmetic is the batch-major force's, operation for operation, so phi' and
    pi' are the eager ones bit for bit (tested).  Kept as separate graphs: in one graph
    inductor fuses the transpositions into the MD loops, whose loads then gather again."""
    eps = length / n_steps

    def force(x):
        return action.force(x, dims=(0, 1))

    def md(p, q):
        return integrator(p, q, force, eps, n_steps)

    def batch_first(p, q):
        return p.permute(2, 0, 1).contiguous(), q.permute(2, 0, 1).contiguous()

    return md, batch_first


def end_parts(action):
    """What both layouts compute after the MD, on contiguous [B, L0, L1] end points, as one
    graph each: ``end_action(phi')`` = S(phi') and ``end_step(phi, S, pi, phi', pi', log_u)``,
    the Metropolis test with S(phi') and the trajectory's acceptance probability and
    divergence (:func:`hpcflow.hmc.metropolis_info`).  The same graphs for
    both layouts and any B, so S and dH (sums whose order inductor chooses per graph) do
    not depend on the layout, which depends on the replicas per rank (a sum of the end
    point fused into the site-major graphs made dH differ between 1 and 2 ranks)."""

    def end_action(phi_new):
        return action.action(phi_new)

    def end_step(phi, S, pi, phi_new, pi_new, log_u):
        return metropolis_info(phi, S, pi, phi_new, pi_new, action.action(phi_new), log_u)

    return end_action, end_step


#: Inductor settings of every :class:`CompiledGraph`, under its own: no shape and stride
#: assertions on the graph's inputs in the Python wrapper of each call (``size_asserts``):
#: a graph is called directly only with the signature it was compiled for
#: (:func:`_signature`: shapes and strides included), and through dynamo, whose guards
#: check them, otherwise.  They cost about 10 us a call of a graph with 14 inputs (an FHMC
#: kick-drift) on the 2-core development machine (exploratory, 56 -> 46 us at B = 1).
GRAPH_INDUCTOR = {"size_asserts": False}


def _signature(args) -> tuple:
    """What a compiled graph is specialised on, per argument: a tensor's shape, strides,
    dtype, device and requires_grad; any other value itself (dynamo specialises on it)."""
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
                 if isinstance(a, torch.Tensor) else (type(a), a) for a in args)


class CompiledGraph:
    """``fn`` compiled by ``torch.compile`` (inductor, ``fullgraph``, static shapes), called
    under ``torch.no_grad()``, and, once compiled for a signature, called without dynamo.

    A call through dynamo evaluates the frame and its guards and wraps the graph: 26 us per
    call on the 2-core development machine, against 10.1 us for a call of the same inductor
    code directly (a two-operation graph on 4 numbers; results/bench-cpu.json,
    ``call_overhead``), and an HMC step calls four graphs.  So the backend here is inductor's own
    (``compile_fx``, what ``backend="inductor"`` runs), and it keeps what it compiles: the
    first call of a signature (:func:`_signature`: the tensors' shapes, strides, dtypes and
    devices, the other arguments' values) runs through dynamo and compiles; its graph is
    then called directly for every later call of that signature.

    The direct call needs what dynamo's guards would check: the signature (a new one goes
    through dynamo, which recompiles), the grad mode (always no_grad here, see
    :func:`_without_grad`), and the tensors the function reads besides its arguments (the
    attributes of a bound method, e.g. :class:`StencilFlow`'s tables): they are taken as
    they were at compilation, so they must stay the same tensors (mutated in place they are
    still seen; rebound, they are not).  A graph is used directly only if that is safe to
    decide: the compiled graph's inputs are the call's tensors (matched by identity) and
    such closure tensors, its outputs are the tensors ``fn`` returned, and a second call of
    it gives them bit for bit; otherwise that signature stays with dynamo (``direct_calls``
    and ``dynamo_calls`` count the two kinds).  dynamo caches graphs per code object, so a
    first call that another compilation of the same code served (another CompiledGraph of
    the same closure, a plain torch.compile of the function) drops that cache entry and
    compiles again, once, for this object.

    ``inductor``: settings of ``torch._inductor.config`` for this graph's compilation only
    (``compile_fx``'s ``config_patches``; inductor's disk cache keys on them), e.g.
    :data:`MD_INDUCTOR`, over :data:`GRAPH_INDUCTOR`."""

    def __init__(self, fn: Callable, inductor: dict | None = None):
        self.fn = fn
        self.inductor = {**GRAPH_INDUCTOR, **(inductor or {})}
        self._dynamo = torch.compile(fn, dynamic=False, fullgraph=True, backend=self._backend)
        self._compiled: list = []
        self._direct: dict = {}
        self._tried: set = set()
        self.direct_calls = self.dynamo_calls = 0

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graph = compile_fx(gm, example_inputs, config_patches=self.inductor or None)
        self._compiled.append((graph, list(example_inputs)))
        return graph

    @staticmethod
    def _inputs(plan, args, bound):
        return [args[i] if i >= 0 else bound[-1 - i] for i in plan]

    def __call__(self, *args):
        if torch.is_grad_enabled():  # (entering no_grad costs a few us a call; a
            with torch.no_grad():    # trajectory of 13 calls already runs without grad)
                return self._call(args)
        return self._call(args)

    def _call(self, args):
        signature = _signature(args)
        direct = self._direct.get(signature)
        if direct is not None:
            graph, plan, bound, single = direct
            self.direct_calls += 1
            out = graph(*self._inputs(plan, args, bound))
            return out[0] if single else tuple(out)
        self._compiled.clear()
        self.dynamo_calls += 1
        out = self._dynamo(*args)
        if not self._compiled and signature not in self._tried:
            # dynamo caches per code object: another CompiledGraph of the same code (or
            # a torch.compile of it) served this call from its own graph, which this
            # one cannot call directly; drop that entry and compile this one's
            from torch._dynamo.eval_frame import reset_code

            reset_code(getattr(self.fn, "__func__", self.fn).__code__)
            out = self._dynamo(*args)
        self._tried.add(signature)
        if len(self._compiled) == 1:
            self._adopt(signature, args, out, *self._compiled[0])
        self._compiled.clear()
        return out

    def _adopt(self, signature, args, out, graph, example_inputs) -> None:
        """Call ``graph`` directly for ``signature`` from now on, if that gives ``out``."""
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else out
        if not isinstance(outs, tuple) or not all(isinstance(o, torch.Tensor) for o in outs):
            return
        plan, bound = [], []
        for x in example_inputs:
            hits = [i for i, a in enumerate(args) if a is x]
            if not isinstance(x, torch.Tensor) or len(hits) > 1:
                return
            if not hits:
                bound.append(x)
            plan.append(hits[0] if hits else -len(bound))
        again = graph(*self._inputs(plan, args, bound))
        if (not isinstance(again, (list, tuple)) or len(again) != len(outs)
                or not all(isinstance(a, torch.Tensor) and a.shape == b.shape
                           and a.dtype == b.dtype and torch.equal(a, b)
                           for a, b in zip(again, outs))):
            return
        self._direct[signature] = (graph, plan, bound, single)


def compile_graph(fn: Callable, inductor: dict | None = None) -> CompiledGraph:
    """``fn`` (tensors in, a tensor or a tuple of tensors out) compiled, static shapes,
    called without grad and, once compiled, without dynamo (:class:`CompiledGraph`), with
    the inductor settings ``inductor`` for this graph."""
    return CompiledGraph(fn, inductor)


#: Inductor settings of the compiled HMC MD graphs (both layouts).  Inductor inlines a
#: pointwise value into each of its consumers unless it has several users and reads more
#: than ``realize_reads_threshold`` (4) buffers; a drift phi + eps pi reads two, so each of
#: the five stencil reads of the next force recomputed it, and the recomputations nest over
#: the MD steps (the L = 16, B = 64 trajectory graph loaded 126 vectors in 13 loops, against
#: 66 in 11 with 1).  At 1 every value with several users that reads more than one buffer
#: is stored once, as the C loop does.  The same operations, so the same numbers bit for
#: bit (tested).  The FHMC graphs have their own settings, :data:`FLOW_INDUCTOR`.
#: Measured by the bench, ``inductor_default`` (results/bench-cpu.json): the trajectory
#: 1.14 to 1.28 times faster with this setting at L = 64 or B >= 64 (1.02 at L = 16, B = 1).
MD_INDUCTOR = {"realize_reads_threshold": 1}


def hmc_trajectory(action, integrator, length: float, n_steps: int, layout: str,
                   metropolis: bool = True, inductor: dict | None = None) -> Callable:
    """The compiled HMC trajectory (phi, pi) -> (phi', pi', S(phi')) on [B, L0, L1] batches
    in ``layout``: the MD (site-major: :func:`sites_first`, :func:`site_major_parts`;
    batch-major: the integrator on the batch, one graph), then :func:`end_parts`.  With
    ``metropolis`` it carries ``step`` (phi, S, pi, log_u) -> (phi_out, S_out, dH, accepted,
    probability, divergent) (:func:`hpcflow.hmc.metropolis_info`).
    ``inductor``: the MD graph's inductor settings (None: :data:`MD_INDUCTOR`; ``{}``:
    inductor's defaults)."""
    md_inductor = MD_INDUCTOR if inductor is None else inductor
    if layout == "site-major":
        md, back = site_major_parts(action, integrator, length, n_steps)
        to_sites, back = compile_graph(sites_first), compile_graph(back)
        md = compile_graph(md, md_inductor)

        def end_points(phi, pi):
            return back(*md(*to_sites(phi, pi)))
    else:
        eps = length / n_steps
        end_points = compile_graph(lambda phi, pi: integrator(phi, pi, action.force, eps, n_steps),
                                   md_inductor)
    end_action, end_step = (compile_graph(f) for f in end_parts(action))

    def trajectory(phi, pi):
        phi_new, pi_new = end_points(phi, pi)
        return phi_new, pi_new, end_action(phi_new)

    trajectory.graphs = ([to_sites, md, back] if layout == "site-major" else [end_points]
                         ) + [end_action, end_step]

    if metropolis:
        def step(phi, S, pi, log_u):
            return end_step(phi, S, pi, *end_points(phi, pi), log_u)

        trajectory.step = step
    return trajectory


#: Inductor settings of the compiled FHMC graphs (:class:`StencilFlow`): every value with
#: several users that reads more than one buffer is stored once (as :data:`MD_INDUCTOR`;
#: without it the tanh of s and t was recomputed in three loops), and the gathers are
#: compiled without per-row bounds checks (``assert_indirect_indexing``; StencilFlow
#: checks its tables once when it builds them).  Measured in the bench, same rounds
#: (results/bench-cpu-epyc.json as of 8742f15, ``fhmc.compiled.inductor_default``): the
#: flowed force and action in 243 us at L = 16, B = 64, against 329 us at inductor's
#: defaults (292 against 349 us in the noisier run at 2d6f513).
FLOW_INDUCTOR = {"realize_reads_threshold": 1, "assert_indirect_indexing": False}


def md_inductor(action) -> dict:
    """The inductor settings of ``action``'s compiled MD graphs: :data:`FLOW_INDUCTOR` for a
    FlowedAction, :data:`MD_INDUCTOR` otherwise (what ``inductor=None`` means)."""
    return FLOW_INDUCTOR if type(action) is FlowedAction else MD_INDUCTOR


def stencil_trajectory(stencil: "StencilFlow", integrator, length: float, n_steps: int,
                       compiled: bool = False, inductor: dict | None = None) -> Callable:
    """(z, pi) -> (z', pi', S~(z')) of ``integrator`` over the flowed action of ``stencil``:
    the layout changes once each way (:meth:`StencilFlow.halves`), and the integrator's
    schedule (:meth:`hpcflow.hmc.Integrator.schedule`: a kick, then drift and kick pairs)
    runs on the halves regrouped as kick-then-drift pairs, one :meth:`StencilFlow.kick_drift`
    per force but the last, which is :meth:`StencilFlow.kick_action` (the kick and S~ at
    the end point).  The same operations in the same order as the integrator's.  With
    ``compiled`` each is one graph (:func:`compile_graph`, inductor settings ``inductor``,
    None: :data:`FLOW_INDUCTOR`; the coefficients are 0-d tensor arguments, so every
    kick-drift of the trajectory is the same graph), the change to halves is one more, and
    the trajectory carries ``step`` (phi, S, pi, log_u) -> (phi_out, S_out, dH, accepted,
    probability, divergent), with the Metropolis test (:func:`hpcflow.hmc.metropolis_info`)
    compiled too, what
    :func:`hpcflow.hmc.hmc_step` calls (always compiled when the force is, so dH is
    computed alike whatever the replicas per rank).  Its ``graphs``: the compiled ones."""
    schedule = integrator.schedule(length / n_steps, n_steps)
    if schedule[0][0] is not None or any(d is None for d, _ in schedule[1:]):
        raise ValueError("a schedule starts with a kick and then alternates drifts and kicks")
    # (a_0, b_1), (a_1, b_2), ..., (a_{n-1}, b_n): kick, then drift; a_n: the last kick
    pairs = [(schedule[i][1], schedule[i + 1][0]) for i in range(len(schedule) - 1)]
    last = schedule[-1][1]
    settings = FLOW_INDUCTOR if inductor is None else inductor
    kick_drift = compile_graph(stencil.kick_drift, settings) if compiled else stencil.kick_drift
    kick_action = (compile_graph(stencil.kick_action, settings) if compiled
                   else stencil.kick_action)
    both_halves = compile_graph(stencil.both_halves) if compiled else stencil.both_halves
    coefficients = {}

    def trajectory(z, pi):
        z_0, z_1, p_0, p_1 = both_halves(z, pi)
        if not compiled:
            steps, a_n = pairs, last
        else:
            if z_0.device not in coefficients:
                def c(x):
                    return torch.tensor(x, dtype=z_0.dtype, device=z_0.device)
                coefficients[z_0.device] = [(c(a), c(b)) for a, b in pairs], c(last)
            steps, a_n = coefficients[z_0.device]
        for a, b in steps:
            z_0, z_1, p_0, p_1 = kick_drift(z_0, z_1, p_0, p_1, a, b)
        p_0, p_1, S = kick_action(z_0, z_1, p_0, p_1, a_n)
        # back eagerly (inductor's code for this gather ran 2.8 times longer than eager's),
        # to contiguous tensors: the graphs were compiled for the example's strides
        return (stencil.lattice((z_0, z_1)).contiguous(),
                stencil.lattice((p_0, p_1)).contiguous(), S)

    trajectory.graphs = [kick_drift, kick_action, both_halves] if compiled else []
    if compiled:
        test = compile_graph(metropolis_info)

        def step(phi, S, pi, log_u):
            return test(phi, S, pi, *trajectory(phi, pi), log_u)

        trajectory.step = step
        trajectory.graphs.append(test)
    return trajectory


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _without_grad(fn: Callable) -> Callable:
    """``fn`` called under ``torch.no_grad()``.  dynamo guards a graph on the grad mode, so
    a graph compiled in one mode (the example call) is compiled again when called in the
    other (a production's trajectories): MD needs no gradients, so every call runs in one
    mode and a process compiles once per shape."""

    def call(*args):
        with torch.no_grad():
            return fn(*args)

    return call


def new_job() -> None:
    """Empty dynamo's in-memory caches before a job that shares its process with earlier
    ones (``scan run``: every job of a scan in one process).  Every compiled trajectory is
    a closure over the same code object, and dynamo caches graphs per code object: after
    ``torch._dynamo.config.recompile_limit`` (8) jobs with other shapes or MD settings it
    stops compiling and runs the rest eager, with only a warning (the continuum scan's
    L24-hmc-tau2 and L24-hmc-tau4 did).  A job is then compiled as in a fresh process; inductor's
    disk cache is kept."""
    torch._dynamo.reset()


#: CPU: a batch-major batch of more than ``CPU_CHUNK_ABOVE`` sites (2^21 sites are 16 MB per
#: float64 field, beyond a CPU's last-level cache share), a site-major one of more than
#: ``CPU_CHUNK_SITES``, runs its compiled HMC trajectory in chunks of replicas of at most
#: ``CPU_CHUNK_SITES`` sites (:func:`chunked`), so that a chunk's fields stay in cache for
#: the 2 n_steps + 1 passes of its trajectory instead of streaming from memory on every
#: pass.  Measured in one bench run on the 2-core development machine
#: (results/bench-cpu.json, ``unchunked``), site-major: L = 64 trajectories at 647, 503, 482
#: M site-steps/s chunked (B = 64, 256, 1024) against 498, 328, 225 M in one call; the
#: L = 16, B = 1024 one at 564 chunked against 459 M (an earlier run had batches within
#: the cache a few per cent slower chunked; those beyond it gain up to 3.5 times; chunks of
#: 16384, 32768 and 131072 sites, tried once, were not faster).  Batch-major, in an earlier run,
#: batches that fit in cache ran 7-20 % slower chunked, hence its higher threshold.
#: ``python -m hpcflow.bench --chunk-sites N`` measures another chunk size.
CPU_CHUNK_SITES = 65536
CPU_CHUNK_ABOVE = 2 ** 21


LAYOUTS = ("site-major", "batch-major")


#: Smallest batch (replicas per rank) run site-major on a CPU: the batch is the vectorised
#: dimension there (16 float64 lanes in inductor's AVX-512 loops); a batch of one ran 2.9
#: (L = 16) and 1.7 (L = 64) times slower site-major (results/bench-cpu.json, ``other_layout``).
SITE_MAJOR_MIN_BATCH = 16


def default_layout(device, B: int) -> str:
    """The compiled HMC trajectory's layout for B chains on ``device``: site-major on a CPU
    for B >= :data:`SITE_MAJOR_MIN_BATCH` (measured in the bench, ``other_layout``: the
    batch-major step at B = 64 ... 1024 took 1.13 to 1.41 times as long), batch-major
    elsewhere (a GPU reads the rolls of a [B, L0, L1] batch coalesced, and the
    transpositions would be two more passes; not measured, no GPU was lent).  The layouts
    give the same numbers bit for bit, so the choice, which depends on the replicas per
    rank, does not make chains depend on the rank count."""
    cpu = torch.device(device).type == "cpu"
    return "site-major" if cpu and B >= SITE_MAJOR_MIN_BATCH else "batch-major"


def chunk_rows(B: int, sites: int, device, chunk_sites: int | None = None,
               layout: str = "batch-major") -> int:
    """Replicas per call for a batch of B chains of ``sites`` sites each: B on a GPU (it
    wants the whole batch), with ``chunk_sites`` 0, or on a CPU for a batch of at most
    :data:`CPU_CHUNK_ABOVE` sites (batch-major) or :data:`CPU_CHUNK_SITES` (site-major);
    else B split into n = ceil(B sites / chunk_sites) chunks of ceil(B / n) replicas (at
    least one).  ``chunk_sites`` None: :data:`CPU_CHUNK_SITES` (given explicitly, it applies
    to any batch larger than itself)."""
    above = ((CPU_CHUNK_SITES if layout == "site-major" else CPU_CHUNK_ABOVE)
             if chunk_sites is None else chunk_sites)
    if chunk_sites is None:
        chunk_sites = CPU_CHUNK_SITES
    if chunk_sites <= 0 or torch.device(device).type != "cpu" or B * sites <= above:
        return B
    n = -(-B * sites // chunk_sites)
    return -(-B // n)


def chunked(fn: Callable, rows: int) -> Callable:
    """``fn`` over per-replica tensors (the trajectory (phi, pi) -> (phi', pi', S), the step
    (phi, S, pi, log_u) -> (phi_out, S_out, dH, accepted, ...)) run on chunks of ``rows``
    replicas of the batch, the results joined.  Chains are independent, so each row's
    result is the one of the whole batch; the last chunk is padded with zeros (whose results
    are dropped), so ``fn`` sees one shape and is compiled once."""

    def call(*args):
        B = args[0].shape[0]
        if B <= rows:
            return fn(*args)
        parts = []
        for i in range(0, B, rows):
            xs = [a[i:i + rows] for a in args]
            n = xs[0].shape[0]
            if n < rows:
                xs = [torch.cat([x, x.new_zeros(rows - n, *x.shape[1:])]) for x in xs]
            parts.append([y[:n] for y in fn(*xs)])
        return tuple(torch.cat(ys) for ys in zip(*parts))

    call.rows = rows
    return call


def compile_trajectory(action, integrator, length: float, n_steps: int,
                       example: tuple[torch.Tensor, torch.Tensor] | None = None,
                       chunk_sites: int | None = None, metropolis: bool | None = None,
                       layout: str | None = None, inductor: dict | None = None) -> Callable:
    """The fused trajectory (phi, pi) -> (phi', pi', S(phi')) of ``integrator`` over
    ``action`` with step length / n_steps (see the module docstring for what is fused);
    its ``graphs`` are the :class:`CompiledGraph` it calls.
    With ``metropolis`` (a Phi4Action only) it carries ``step``, the trajectory and the
    Metropolis test compiled (:func:`hmc_trajectory`; what :func:`eager_step` computes),
    which :func:`hpcflow.hmc.hmc_step`
    calls instead, and the example compiles the step (the trajectory alone, lazily).

    With ``example`` = (phi, pi) the compilation happens here, and a failure raises
    :class:`CompileUnavailable` with the reason in one line (callers fall back to
    :func:`eager_trajectory`); without it, at the first call.  HMC on a CPU with an example
    of more than ``chunk_sites`` sites runs in chunks of replicas (:func:`chunk_rows`,
    :func:`chunked`; the same numbers, bit for bit); ``chunk_sites`` None: the module's
    :data:`CPU_CHUNK_SITES`, 0: never.

    ``layout`` (HMC): ``"site-major"`` (:func:`hmc_trajectory`) or ``"batch-major"``
    (the trajectory on [B, L0, L1] as one graph); None: :func:`default_layout` of the
    example (batch-major without one).  Both give the same numbers bit for bit.
    ``metropolis`` None: fused (HMC), whatever the layout: the fused test's dH and S
    differ from the eager test's by rounding, so a choice that depended on the layout,
    which depends on the replicas per rank, would make the chains depend on the rank count
    (tests/test_mpi.py caught it).  ``inductor`` (HMC): the MD graph's inductor settings
    (None: :data:`MD_INDUCTOR`)."""
    if type(action) is FlowedAction:
        reason = _flowed_reason(action)
        if reason is not None:
            raise CompileUnavailable(f"FlowedAction is not fused: {reason}")
        device = example[0].device if example is not None else "cpu"
        stencil = StencilFlow(action.target, action.flow, device)
        trajectory = stencil_trajectory(stencil, integrator, length, n_steps, compiled=True,
                                        inductor=inductor)
        fn = _without_grad(trajectory)
        fn.graphs = trajectory.graphs
        fn.step = _without_grad(trajectory.step)
        # the force alone, as one graph, for the bench's force timing (compiled at its first call)
        fn.stencil = stencil
        fn.force_and_action = compile_graph(stencil.force_and_action,
                                            md_inductor(action) if inductor is None else inductor)
    elif compilable(action):
        if example is not None:
            layout = layout or default_layout(example[0].device, example[0].shape[0])
        layout = layout or "batch-major"
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if metropolis is None:
            metropolis = True
        fn = hmc_trajectory(action, integrator, length, n_steps, layout, metropolis, inductor)
        step, graphs = getattr(fn, "step", None), fn.graphs
        if example is not None:
            phi = example[0]
            rows = chunk_rows(phi.shape[0], phi[0].numel(), phi.device, chunk_sites, layout)
            if rows < phi.shape[0]:
                fn = chunked(fn, rows)
                fn.graphs = graphs
                step = chunked(step, rows) if step is not None else None
        if step is not None:
            fn.step = _without_grad(step)  # one no_grad a step, not one a graph
        fn.layout = layout
    else:
        raise CompileUnavailable(f"{type(action).__name__} is not fused (only Phi4Action and "
                                 "FlowedAction over it)")
    if example is not None:
        try:
            if hasattr(fn, "step"):  # what hmc_step calls; the trajectory alone compiles lazily
                phi, pi = example
                fn.step(phi, phi.new_zeros(phi.shape[0]), pi, phi.new_zeros(phi.shape[0]))
            else:
                fn(*example)
        except Exception as err:  # inductor raises many types; all mean "not here"
            raise CompileUnavailable(f"torch.compile failed: {_first_line(err)}") from None
    return fn


def choose_trajectory(mode: str, action, integrator, length: float, n_steps: int,
                      example: tuple[torch.Tensor, torch.Tensor], log=print):
    """The trajectory function for ``[run] compile`` = ``mode``, and whether it is fused.

    ``off``: eager.  ``on``: compiled, or CompileUnavailable.  ``auto``: compiled when the
    action is fusable and compilation works, else eager with one line saying why."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not compilable(action)):
        return eager_trajectory(action, integrator, length, n_steps), False
    try:
        return compile_trajectory(action, integrator, length, n_steps, example), True
    except CompileUnavailable as err:
        if mode == "on":
            raise
        log(f"[compile] {err}; using the eager path")
        return eager_trajectory(action, integrator, length, n_steps), False


# ---------------------------------------------------------------------------------------
# FHMC: the frozen minimal flow as gathers on site-major fields


def _step_tables(layer, order: torch.Tensor, pos: torch.Tensor):
    """Gather tables of one coupling step without hidden channels (weights w_s, w_t [k, k]).

    With frozen parity p (rows A = [pH, (p+1)H) of the checkerboard order), updated rows
    B = [qH, (q+1)H), and the offsets a_j of the k x k window that lead from a B site to an
    A site ((a0 + a1) odd; the others read masked zeros):

        idx[r, j]  = row in A of site(B row r) + a_j        (forward: s, t on B from A)
        idxT[r, j] = row in B of site(A row r) - a_j        (pullback: the transpose)
        ws[j] = w_s[a_j + k//2],  wt[j] = w_t[a_j + k//2]."""
    from .flows.layers import convolutions

    L, p, k = layer.L, layer.parity, layer.kernel_size
    q, H, c = 1 - p, L * L // 2, k // 2
    convs = [convolutions(layer.s), convolutions(layer.t)]
    if len(convs[0]) != 1:
        raise CompileUnavailable("the compiled flowed force covers flows without hidden "
                                 f"channels (this one has {layer.hidden})")
    offsets = [(a0, a1) for a0 in range(-c, c + 1) for a1 in range(-c, c + 1) if (a0 + a1) % 2]
    a0 = torch.tensor([o[0] for o in offsets])
    a1 = torch.tensor([o[1] for o in offsets])

    def shifted(rows, sign):
        site = order[rows]
        x0 = (site[:, None] // L + sign * a0[None, :]) % L
        x1 = (site[:, None] % L + sign * a1[None, :]) % L
        return pos[x0 * L + x1]

    idx = shifted(torch.arange(q * H, (q + 1) * H), 1) - p * H
    idxT = shifted(torch.arange(p * H, (p + 1) * H), -1) - q * H
    assert bool((idx >= 0).all() and (idx < H).all() and (idxT >= 0).all() and (idxT < H).all())
    w = [conv[0].weight.detach().cpu()[0, 0, a0 + c, a1 + c] for conv in convs]
    return p, idx, idxT, w[0], w[1]


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh x = sgn(x) (1 - u) / (1 + u), u = exp(-2 |x|): one exp and a division, which
    inductor's CPU code vectorises at about half the cost of its tanh (float64); absolute
    error a few 1e-16 (relative error larger only for |x| << 1, where tanh itself is small)."""
    u = torch.exp(-2.0 * torch.where(x < 0, -x, x))
    r = (1.0 - u) / (1.0 + u)
    return torch.where(x < 0, -r, r)


class StencilFlow:
    """The frozen generator g and force pullback of a flow without hidden channels (the
    paper's minimal model and any k) written with gathers, for torch.compile.

    Same formulas as :class:`hpcflow.flows.FrozenFlow` (see :mod:`hpcflow.flows.frozen`):
    per step y_B = e x_B + t, e = exp(-|s|), s = tanh(sum_j ws_j x_A[idx_j]), t likewise;
    pullback f_x,B = e f_y,B, f_x,A = f_y,A + sum_j (ws_j g_s + wt_j g_t)[idxT_j] with
    g_s = -sgn(s) (e x_B f_y,B + 1)(1 - s^2), g_t = f_y,B (1 - t^2); the global scale
    phi = exp(lambda) y.  A field is held as its two checkerboard *halves* (:meth:`halves`),
    each site-major [H, N] (H = V/2 rows of the parity, in row-major site order; the batch
    index is the contiguous one, so a gather reads whole rows and the loops over the batch
    vectorise).  A coupling step reads one half and writes the other, and every nearest
    neighbour of a site is in the other half, so no graph joins or splits a [V, N] array
    (a join is a copy pass).  Every operation is elementwise or a gather, so inductor fuses
    a force (generator, target force, pullback) into a few loops; :data:`FLOW_INDUCTOR`
    makes it store each value that several loops read instead of recomputing it.

    The compiled entry points take and return flat tensors (halves as two arguments):
    :meth:`force_and_action`, :meth:`kick_drift`, :meth:`kick_action`.
    ``target`` is a :class:`~hpcflow.action.Phi4Action`; its force and action are written
    with neighbour tables on the same layout."""

    def __init__(self, target, flow, device):
        from .flows.frozen import site_order

        if type(target) is not Phi4Action:
            raise CompileUnavailable(f"the compiled flowed force needs a Phi4Action target, "
                                     f"not {type(target).__name__}")
        couplings = list(getattr(flow, "couplings", ()))
        if not couplings or not hasattr(flow, "scale"):
            raise CompileUnavailable(f"{type(flow).__name__} is not a Flow with couplings")
        L = flow.L
        self.L, self.V, self.H = L, L * L, L * L // 2
        H = self.H
        self.beta, self.lam = target.beta, target.lam
        self.log_scale = float(flow.scale.log_scale.detach())
        self.scale = float(torch.exp(torch.tensor(self.log_scale, dtype=torch.float64)))
        order = site_order(L)
        pos = torch.empty_like(order)
        pos[order] = torch.arange(L * L)
        self.order, self.pos = order.to(device), pos.to(device)
        self.steps = []
        for layer in couplings:
            p, idx, idxT, ws, wt = _step_tables(layer, order, pos)
            # (w_s, w_t) stacked once: [1, n, 2, 1] against the gathered [H, n, 2, N] rows
            w = torch.stack((ws, wt), 1).to(device, torch.float64)[None, :, :, None]
            self.steps.append((p, idx.to(device), idxT.to(device), w))
        # neighbours of every row: x -+ e_1 (within a lattice row), x -+ e_0, in the order of
        # Phi4Action.force's neighbour_sum (roll +1, -1 along x1, then along x0); those of
        # the rows of parity q are rows of parity 1 - q: nb[q] indexes that half
        x0, x1 = order // L, order % L
        nb = torch.stack([pos[x0 * L + (x1 - 1) % L], pos[x0 * L + (x1 + 1) % L],
                          pos[((x0 - 1) % L) * L + x1], pos[((x0 + 1) % L) * L + x1]], 1)
        self.nb = [nb[:H] - H, nb[H:]]
        # FLOW_INDUCTOR compiles the gathers without bounds checks: check the tables here
        for table in self.nb + [t for _, idx, idxT, _ in self.steps for t in (idx, idxT)]:
            if not bool(((table >= 0) & (table < H)).all()):
                raise AssertionError("a StencilFlow gather table leaves its half")
        self.nb = [t.to(device) for t in self.nb]

    # layouts
    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, L] -> (x_0, x_1): the checkerboard halves, [H, B] each, contiguous."""
        rows = x.reshape(x.shape[0], -1).t().index_select(0, self.order)
        return rows[:self.H], rows[self.H:]

    def both_halves(self, z: torch.Tensor, pi: torch.Tensor):
        """(z_0, z_1, pi_0, pi_1): :meth:`halves` of z and pi, one graph when compiled."""
        return (*self.halves(z), *self.halves(pi))

    def lattice(self, h) -> torch.Tensor:
        """(x_0, x_1) -> [B, L, L]."""
        return torch.cat(tuple(h)).index_select(0, self.pos).t().reshape(-1, self.L, self.L)

    # the target on checkerboard halves
    def target_force(self, phi):
        out = []
        for q in (0, 1):
            x, y, nb = phi[q], phi[1 - q], self.nb[q]
            nsum = ((y[nb[:, 0]] + y[nb[:, 1]]) + y[nb[:, 2]]) + y[nb[:, 3]]
            out.append(self.beta * nsum - 2.0 * x - (4.0 * self.lam) * x * (x * x - 1.0))
        return out

    def target_action(self, phi) -> torch.Tensor:
        S = None
        for q in (0, 1):
            x, y, nb = phi[q], phi[1 - q], self.nb[q]
            forward = y[nb[:, 1]] + y[nb[:, 3]]
            x2 = x * x
            d = (-self.beta * x * forward + x2 + self.lam * (x2 - 1.0) ** 2).sum(0)
            S = d if S is None else S + d
        return S

    # the flow
    def generate(self, z, keep: bool):
        """z = (z_0, z_1) -> (phi = (phi_0, phi_1), log|det dg/dz| [N], saved values for
        the pullback)."""
        y = list(z)
        logdet = None
        saved = []
        for p, idx, idxT, w in self.steps:
            A, B = y[p], y[1 - p]
            G = A[idx]                                   # [H, n, N]
            # s and t as one [H, 2, N] array from one pass over the gathered rows
            st = _tanh((w * G[:, :, None]).sum(1))
            s, t = st[:, 0], st[:, 1]
            abs_s = torch.where(s < 0, -s, s)
            e = torch.exp(-abs_s)
            if keep:
                saved.append((e, s, t, B))
            y[1 - p] = e * B + t
            d = abs_s.sum(0)
            logdet = -d if logdet is None else logdet - d
        logdet = logdet + self.log_scale * self.V
        return [self.scale * y[0], self.scale * y[1]], logdet, saved

    def pullback(self, F, saved):
        """F = -dS/dphi (halves) -> -dS~/dz (halves), the formulas of the class docstring."""
        f = [self.scale * F[0], self.scale * F[1]]
        for (p, idx, idxT, w), (e, s, t, x_B) in zip(reversed(self.steps), reversed(saved)):
            f_A, f_B = f[p], f[1 - p]
            sgn = torch.where(s < 0, -1.0, 1.0)
            c0 = -sgn * (1.0 - s * s)
            g_s = (c0 * e * x_B) * f_B + c0
            g_t = (1.0 - t * t) * f_B
            # g_s and g_t gathered as one [H, 2, N] array: stacked, inductor stores them
            # once instead of recomputing them at each of the n gathered neighbours
            g = torch.stack((g_s, g_t), 1)
            f[p] = f_A + (w * g[idxT]).sum((1, 2))
            f[1 - p] = e * f_B
        return f

    def force(self, z):
        """F~ = -dS~/dz on halves."""
        phi, _, saved = self.generate(z, True)
        return self.pullback(self.target_force(phi), saved)

    def action(self, z) -> torch.Tensor:
        """S~(z) = S(g(z)) - log|det dg/dz|, [N]."""
        phi, logdet, _ = self.generate(z, False)
        return self.target_action(phi) - logdet

    def force_and_action(self, z_0, z_1):
        """(F~_0, F~_1, S~) at z = (z_0, z_1), from one evaluation of the generator."""
        phi, logdet, saved = self.generate((z_0, z_1), True)
        F = self.pullback(self.target_force(phi), saved)
        return F[0], F[1], self.target_action(phi) - logdet

    def kick_drift(self, z_0, z_1, p_0, p_1, a, b):
        """A momentum kick p' = p + a F~(z) and then a drift z' = z + b p':
        (z'_0, z'_1, p'_0, p'_1).  The drift comes after the force, so the force's gathers
        read the graph's input z, never a drift recomputed in each of them."""
        F = self.force((z_0, z_1))
        p_0, p_1 = p_0 + a * F[0], p_1 + a * F[1]
        return z_0 + b * p_0, z_1 + b * p_1, p_0, p_1

    def kick_action(self, z_0, z_1, p_0, p_1, a):
        """The last kick of a trajectory and the flowed action at its end point:
        (p_0 + a F~_0(z), p_1 + a F~_1(z), S~(z))."""
        F_0, F_1, S = self.force_and_action(z_0, z_1)
        return p_0 + a * F_0, p_1 + a * F_1, S
