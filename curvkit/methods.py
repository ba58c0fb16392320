r"""The method API: what a plugin registers to add a second-order method.

A method is a :class:`MethodSpec`: a name, a frozen keyword-only configuration dataclass
that validates itself (every bad value is reported with its legal range, see
:class:`~curvkit.config.ValidatedConfig`), and a *block factory* that builds one
:class:`~curvkit.blocks.CurvatureBlock` per tracked layer. The optimizers
(:mod:`curvkit.optim`) do the rest: statistics capture, the ``T_stats`` / ``T_inv``
schedule, EMA weights, damping state, step rules and checkpoints.

Most Kronecker methods subclass :class:`KroneckerConfig`, which holds the knobs the whole
K-FAC family shares (Fisher type, expand/reduce, EMA decay, ``T_stats``, ``T_inv``,
damping, inverter, factor structure). Example (what ``plugins/curvkit_kfac`` does)::

    @dataclass(frozen=True, kw_only=True)
    class KFACConfig(KroneckerConfig):
        pass

    def kfac_block(info, config, registry):
        return KroneckerBlock(info, structure=config.structure_classes(registry),
                              inverter=config.inverter_object(registry))

    KFAC_SPEC = MethodSpec(name="kfac", config_cls=KFACConfig, block_factory=kfac_block,
                           summary="K-FAC / KFC", reference="Martens & Grosse (2015)")

    @hookimpl
    def curvkit_register_methods(register):
        register.add(KFAC_SPEC)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, ValidatedConfig, check_number
from curvkit.errors import ConfigError, IncompatibleComponentsError, UnknownComponentError
from curvkit.linalg.damping import Damping, PiDamping
from curvkit.linalg.inverters import Inverter, check_compatible

__all__ = [
    "LOSS_AVERAGES",
    "OPTIMIZER_OPTIONS",
    "KroneckerConfig",
    "MethodConfig",
    "MethodSpec",
    "Schedule",
    "ScheduleValues",
    "StatisticsConfig",
    "check_precondition_dtype",
    "has_dense_sides",
    "names_a_damping",
]


def has_dense_sides(structure: str | tuple[str, str], *, every_side: bool = False) -> bool:
    """Whether a factor ``structure`` (one name, or the pair of the two sides') has a dense
    side (with ``every_side``: only dense sides) — what a bf16 option needs to lower."""
    pair = structure if isinstance(structure, tuple) else (structure, structure)
    dense = [side == "dense" for side in pair]
    return all(dense) if every_side else any(dense)


def check_precondition_dtype(
    out: list[str], value: Any, structure: str | tuple[str, str], *, every_side_dense: bool = False
) -> None:
    """The problems of a method's ``precondition_dtype`` option: it must be ``None`` or
    ``torch.bfloat16``, and the factor ``structure`` must give the products something dense
    to run in bf16 (at least one ``"dense"`` side; with ``every_side_dense``, both) — else
    the option would change nothing, and it is refused instead."""
    if value is None:
        return
    if value is not torch.bfloat16:
        out.append(
            f"precondition_dtype={value!r} must be None (the factors' dtype) or torch.bfloat16 (bf16 products with "
            "float32 accumulation)"
        )
        return
    if not has_dense_sides(structure, every_side=every_side_dense):
        out.append(
            f"precondition_dtype={value} runs the dense preconditioning products in bf16, but structure="
            f"{structure!r} has {'structured' if every_side_dense else 'no dense'} ones, where it would change "
            "nothing: use structure='dense' or drop precondition_dtype"
        )


#: Legal values of ``loss_average`` (how the training loss is normalised).
LOSS_AVERAGES = (None, "batch", "batch+sequence")

#: Options of :class:`~curvkit.optim.CurvatureOptimizer` itself that a method's recommended
#: settings may hold (the other keys are options of the method's configuration).
OPTIMIZER_OPTIONS = frozenset(
    {
        "lr",
        "momentum",
        "weight_decay",
        "weight_decay_mode",
        "kahan_sum",
        "kl_clip",
        "rms_clip",
        "grad_ratio_clip",
        "adaptive_step",
    }
)


@dataclass(frozen=True, kw_only=True)
class MethodConfig(ValidatedConfig):
    """Base of every method configuration: what every method has.

    A method that captures layer statistics subclasses :class:`StatisticsConfig` (the
    Kronecker family: :class:`KroneckerConfig`); a gradient-based method
    (``MethodSpec(statistics="gradient")``) subclasses this class directly and declares its
    own period fields (see :class:`Schedule`).

    Args:
        unsupported: Modules with parameters but no layer handler: ``"warn"`` (default)
            or ``"skip"`` leave them to a first-order update; ``"error"`` refuses.
    """

    unsupported: UnsupportedPolicy | str = UnsupportedPolicy.WARN

    def normalise(self) -> list[str]:
        out: list[str] = []
        self._enum_field(out, "unsupported", UnsupportedPolicy)
        return out

    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True, kw_only=True)
class StatisticsConfig(MethodConfig):
    """Options of the statistics a method captures from the forward and backward passes.

    Args:
        fisher: ``"empirical"`` (default; needs only ``loss.backward()``), ``"mc"`` or
            ``"type-2"`` (need one extra call, ``optimizer.curvature_backward(output,
            targets)``, before ``loss.backward()``).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers
            (Eschenhagen et al. 2023).
        loss_average: How the training loss is normalised, for the empirical Fisher
            (whose output gradients come from your ``loss.backward()``): ``"batch"`` (a
            mean over the batch, e.g. ``CrossEntropyLoss()``), ``"batch+sequence"`` (a
            mean over batch and sequence positions) or ``None`` (a sum).
        mc_samples: Samples per datum for ``fisher="mc"``.
        backend: Registered statistics backend: ``"hooks"`` (default: the capture engine,
            fed by your own ``loss.backward()``), or ``"backpack"`` / ``"asdl"`` for methods
            whose blocks need only the batch's factors (``MethodSpec.factor_statistics``).
            Another backend runs its own forward and backward: call
            ``optimizer.collect_statistics(inputs, targets)`` before ``step()`` (it does
            nothing on steps without statistics).
        subsample_data: Fraction of each batch's data, in ``(0, 1]``, that a statistics
            step uses per layer (drawn at random; the factors are rescaled to stay
            unbiased, :mod:`curvkit.stats.subsample`). Default 1: every datum.
        subsample_positions: Fraction of the weight-sharing positions (a convolution's
            patches, a sequence's tokens), in ``(0, 1]``, that a statistics step uses per
            layer with ``kfac_approx="expand"`` (SKFAC's spatial subsampling, for every
            method; unbiased ``A`` and ``G``). Default 1: every position.
        stats_dtype: dtype the Gram products of the batch factors ``A`` and ``G`` take
            their inputs in: ``None`` (default: the features' own) or ``torch.bfloat16``
            (bf16 products with float32 accumulation and result; the EMA, the stored
            factors and every decomposition stay in float32 or wider). Per-row statistics
            and per-example gradients are unaffected.
    """

    fisher: FisherType | str = FisherType.EMPIRICAL
    kfac_approx: KFACApprox | str = KFACApprox.EXPAND
    loss_average: str | None = "batch"
    mc_samples: int = 1
    backend: str = "hooks"
    subsample_data: float = 1.0
    subsample_positions: float = 1.0
    stats_dtype: torch.dtype | None = None

    def normalise(self) -> list[str]:
        out = super().normalise()
        self._enum_field(out, "fisher", FisherType)
        self._enum_field(out, "kfac_approx", KFACApprox)
        return out

    def problems(self) -> list[str]:
        out = super().problems()
        if self.loss_average not in LOSS_AVERAGES:
            out.append(f"loss_average={self.loss_average!r} must be one of {', '.join(map(repr, LOSS_AVERAGES))}")
        check_number(out, "mc_samples", self.mc_samples, low=1, integer=True)
        if self.fisher is not FisherType.MC and self.mc_samples != 1 and "mc_samples" not in " ".join(out):
            out.append(f"mc_samples={self.mc_samples!r} only applies to fisher='mc'; leave it at 1")
        if not isinstance(self.backend, str):
            out.append(f"backend={self.backend!r} must be a registered statistics backend name (e.g. 'hooks')")
        if self.stats_dtype not in (None, torch.bfloat16):
            out.append(
                f"stats_dtype={self.stats_dtype!r} must be None (the features' dtype) or torch.bfloat16 (bf16 factor "
                "products with float32 accumulation); decompositions always run in float32 or wider"
            )
        for name in ("subsample_data", "subsample_positions"):
            value = getattr(self, name)
            check_number(out, name, value, low=0.0, high=1.0, low_open=True)
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and 0.0 < value < 1.0
                and self.backend != "hooks"
            ):
                out.append(
                    f"{name}={value!r} needs backend='hooks' (the capture engine subsamples the recorded rows); "
                    f"backend={self.backend!r} computes its own full-batch factors: leave {name} at 1.0"
                )
        return out


@dataclass(frozen=True)
class Schedule:
    """Which fields of a method's configuration the core reads for its schedule.

    The core — not the blocks — counts steps and applies the schedule: statistics every
    ``statistics_period`` steps (``update``), a refresh every ``refresh_period`` steps and
    on a block's first statistics (``refresh``), the EMA weight ``min(1 − 1/k, ρ)`` of
    the ``k``-th update, and the damping strategy handed to ``refresh``. Each entry names
    a field of the configuration class, or is ``None`` when the method has no such knob
    (statistics every step, a refresh every step, ``decay = 0``, no damping). Names are
    checked against the configuration class when the :class:`MethodSpec` is created, so
    a misnamed field (``beta2`` for the EMA) is an error, not a silent default.

    Attributes:
        statistics_period: Field of the statistics period (``"T_stats"``; SINGD's ``"T"``).
        refresh_period: Field of the refresh period (``"T_inv"``).
        ema_decay: Field of the EMA decay ρ (``"ema_decay"``).
        damping: Field of the damping strategy (``"damping"``); its value must be a
            :class:`~curvkit.linalg.damping.Damping` after the configuration's
            ``normalise`` (which turns a float into the method's default strategy).
    """

    statistics_period: str | None = "T_stats"
    refresh_period: str | None = "T_inv"
    ema_decay: str | None = "ema_decay"
    damping: str | None = "damping"

    def fields(self) -> dict[str, str]:
        """``{schedule entry: configuration field}`` of the declared entries."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def check(self, method: str, config_cls: type) -> None:
        """Raise if a declared field is not a field of ``config_cls`` (naming both)."""
        names = {f.name for f in dataclasses.fields(config_cls)}
        for entry, name in self.fields().items():
            if name not in names:
                raise ValueError(
                    f"MethodSpec {method!r}: its schedule reads {entry} from the configuration field {name!r}, which "
                    f"{config_cls.__name__} does not have (fields: {', '.join(sorted(names))}). Declare "
                    f"MethodSpec(schedule=Schedule({entry}='<your field>')), or {entry}=None if the method has none."
                )

    def resolve(self, config: Any, registry: Any) -> None:
        """Turn a damping given by name into the registered strategy, in place.

        The damping field may hold a registered damping's name (``"exact"``: its defaults)
        or a mapping ``{"name": ..., **options}`` (``{"name": "levenberg-marquardt",
        "initial": 10.0}``); the class is looked up in ``registry.dampings`` (the
        :func:`~curvkit.hookspecs.curvkit_register_dampings` hook) and built with the
        options, which it validates.

        Raises:
            UnknownComponentError: The name is not registered (listing those that are).
            ConfigError: The options are not the strategy's, or out of range.
        """
        if self.damping is None:
            return
        value = getattr(config, self.damping)
        if isinstance(value, str):
            name, options = value, {}
        elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
            options = {k: v for k, v in value.items() if k != "name"}
            name = value["name"]
        else:
            return
        cls = registry.dampings.get(name)
        try:
            damping = cls(**options)
        except TypeError as err:
            valid = sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []
            raise ConfigError(
                f"{type(config).__name__}",
                [f"{self.damping}={value!r}: {err}; the options of {cls.__name__} ({name!r}) are {', '.join(valid)}"],
            ) from None
        except ConfigError as err:
            raise ConfigError(
                f"{type(config).__name__}", [f"{self.damping}={value!r}: {problem}" for problem in err.problems]
            ) from None
        object.__setattr__(config, self.damping, damping)

    def read(self, config: Any) -> ScheduleValues:
        """The schedule of ``config`` (validated)."""
        values = {entry: getattr(config, name) for entry, name in self.fields().items()}
        damping = values.get("damping")
        if "damping" in values and not isinstance(damping, Damping):
            raise ConfigError(
                f"{type(config).__name__}",
                [
                    f"{self.damping}={damping!r} is not a damping strategy: the configuration's normalise() must turn "
                    "a float into one (KroneckerConfig does: a float λ becomes its default_damping(value=λ))"
                ],
            )
        return ScheduleValues(
            statistics_period=int(values.get("statistics_period", 1)),
            refresh_period=int(values.get("refresh_period", 1)),
            ema_decay=float(values.get("ema_decay", 0.0)),
            damping=damping,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ScheduleValues:
    """A configuration's schedule, read by :meth:`Schedule.read`."""

    statistics_period: int
    refresh_period: int
    ema_decay: float
    damping: Damping | None


def names_a_damping(value: Any) -> bool:
    """Whether ``value`` names a registered damping (a string, or a mapping with a
    ``"name"``), resolved when the method is built (:meth:`Schedule.resolve`): a
    configuration's ``problems()`` accepts such a value for its damping field."""
    return isinstance(value, str) or (isinstance(value, Mapping) and isinstance(value.get("name"), str))


@dataclass(frozen=True, kw_only=True)
class KroneckerConfig(StatisticsConfig):
    r"""Knobs shared by the K-FAC family.

    Args:
        T_stats: Statistics every ``T_stats`` steps.
        ema_decay: :math:`\rho` in ``A ← ρA + (1−ρ)A_batch``; the k-th update uses
            :math:`\min(1 - 1/k, \rho)` (Martens & Grosse 2015), so the first batch
            initialises the factors.
        T_inv: Inverses/decompositions every ``T_inv`` steps (stale in between).
        damping: A damping strategy (:mod:`curvkit.linalg.damping`); a float ``λ``
            meaning the method's default strategy with that value; or a registered
            damping's name, alone (``"exact"``: its defaults) or with options
            (``{"name": "levenberg-marquardt", "initial": 10.0}``), looked up in the
            registry when the method is built (:meth:`Schedule.resolve`).
        inverter: Registered inverter name (``"cholesky"``, ``"eigh"``, ...).
        structure: Registered factor-structure name for both factors, or a pair
            ``(A's, G's)``.
        factor_dtype: dtype the factors are stored in (default: the parameters').
    """

    T_stats: int = 1
    ema_decay: float = 0.95
    T_inv: int = 10
    damping: Damping | float | str | Mapping[str, Any] = field(default_factory=lambda: PiDamping(value=1e-3))
    inverter: str = "cholesky"
    structure: str | tuple[str, str] = "dense"
    factor_dtype: torch.dtype | None = None

    #: Strategy a bare float ``damping`` becomes.
    default_damping: Any = dataclasses.field(default=PiDamping, init=False, repr=False, compare=False)

    def normalise(self) -> list[str]:
        out = super().normalise()
        if isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool):
            try:
                self._set("damping", self.default_damping(value=float(self.damping)))
            except ConfigError as err:
                out.extend(f"damping: {p}" for p in err.problems)
        return out

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "T_stats", self.T_stats, low=1, integer=True)
        check_number(out, "ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        check_number(out, "T_inv", self.T_inv, low=1, integer=True)
        if not isinstance(self.damping, Damping) and not names_a_damping(self.damping):
            out.append(
                f"damping={self.damping!r} must be a damping strategy (e.g. PiDamping(value=1e-3)), a float > 0, or a "
                "registered damping's name ('pi', 'exact', ...) or {'name': ..., **options}"
            )
        if not isinstance(self.inverter, str):
            out.append(f"inverter={self.inverter!r} must be a registered inverter name (e.g. 'cholesky', 'eigh')")
        s = self.structure
        if not (isinstance(s, str) or (isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, str) for x in s))):
            out.append(f"structure={s!r} must be a registered structure name or a pair of names")
        if self.factor_dtype is not None and not isinstance(self.factor_dtype, torch.dtype):
            out.append(f"factor_dtype={self.factor_dtype!r} must be a torch.dtype or None")
        return out

    # --- resolution against a registry (at build time) -----------------------------------

    def structure_classes(self, registry: Any) -> tuple[Any, Any]:
        names = (self.structure, self.structure) if isinstance(self.structure, str) else self.structure
        return registry.structures.get(names[0]), registry.structures.get(names[1])

    def inverter_object(self, registry: Any) -> Inverter:
        inv = registry.inverters.get(self.inverter)
        return inv() if isinstance(inv, type) else inv

    def check_components(self, registry: Any) -> None:
        """Resolve every component name and check the inverter/damping pair."""
        self.structure_classes(registry)
        if names_a_damping(self.damping):  # not resolved through a MethodSpec: resolve here
            Schedule().resolve(self, registry)
        check_compatible(self.inverter_object(registry), self.damping, registry=registry)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MethodSpec:
    """What a plugin registers for a method.

    Attributes:
        name: Registered name (``"kfac"``).
        class_name: Name of the method's optimizer class in :mod:`curvkit.optim`
            (``"KFAC"``: ``curvkit.optim.KFAC(model, ...)``), built from the registry on
            first use (:func:`curvkit.optim.named.named_class`); ``None`` (default): no
            named class, the method works with :func:`curvkit.optim.create`. A Python
            identifier that starts with an upper-case letter, unique among the methods.
        config_cls: Its frozen, keyword-only, self-validating configuration dataclass.
        block_factory: ``(BlockInfo, config, registry) -> CurvatureBlock``. It may raise
            :class:`~curvkit.UnsupportedModuleError` for a layer the method cannot serve:
            that layer then takes first-order steps, with the message in ``summary()``.
        summary: One line for ``curvkit plugins`` and the docs.
        reference: Citation.
        sample_configs: Keyword sets the conformance suite trains with.
        bad_configs: ``(kwargs, expected exception type)`` the conformance suite expects
            to raise.
        schedule: Which configuration fields hold the statistics and refresh periods, the
            EMA decay and the damping (:class:`Schedule`; default ``T_stats``, ``T_inv``,
            ``ema_decay``, ``damping``). The core applies them; checked against
            ``config_cls`` when the spec is created.
        statistics: What the blocks' ``update(stats, decay)`` gets: ``"layer"`` (default:
            a :class:`~curvkit.blocks.LayerStats` of the layer's captured inputs and output
            gradients, plus the step's gradient in ``stats.gradient``) or ``"gradient"``
            (a :class:`~curvkit.blocks.GradientStats` with the step's gradient only; no
            hooks are installed on the model, as for Shampoo-style methods).
        factor_statistics: Whether the method's blocks need only the batch's factors
            ``A()`` and ``G()``, so a statistics backend other than the capture engine
            (``backend="backpack"``/``"asdl"``), which computes only those, can feed them.
        tied_blocks: Whether the method's blocks work from ``A()``, ``G()`` and
            ``per_example_gradients()`` alone, so they can serve a weight tied in transposed
            layouts (:attr:`~curvkit.blocks.BlockInfo.tied`). Otherwise such a weight takes
            the first-order step, and ``summary()`` says why.
        diagonal_inputs: Whether the method's blocks take a layer with one-hot inputs
            (:attr:`~curvkit.blocks.BlockInfo.diagonal_input`: an ``nn.Embedding``) from
            its 1-D diagonal ``A()``, ``G()`` and sparse per-example gradients, at any
            vocabulary size. Otherwise the method sees explicit one-hot rows, which curvkit
            builds only for embeddings of at most
            :data:`~curvkit.stats.embedding.ONE_HOT_LIMIT` rows; a larger one takes the
            first-order step, and ``summary()`` says why.
        unitwise_block: ``(BlockInfo, config, registry) -> CurvatureBlock`` for unit-wise
            layers (normalisation layers' scale and shift,
            :attr:`~curvkit.blocks.BlockInfo.unitwise`); ``None`` (default) gives them the
            core's exact per-unit :class:`~curvkit.unitwise.UnitwiseBlock`
            (:meth:`~curvkit.unitwise.UnitwiseBlock.from_config`), whatever the method.
        recommended: The method's recommended settings: settings that train at the
            defaults, with a trust region. They are **the defaults everywhere**: of the
            named optimizer class, of :func:`curvkit.optim.create`, of
            :class:`~curvkit.optim.CurvatureOptimizer` with ``method=``, of
            :class:`~curvkit.optim.Preconditioner` (its method options) and of ``curvkit
            bench``. Keys are optimizer options (:data:`OPTIMIZER_OPTIONS`: ``lr``,
            ``momentum``, the trust region ``kl_clip`` / ``rms_clip`` /
            ``grad_ratio_clip``, ...) and options of :attr:`config_cls`; an optional
            ``"tasks"`` entry maps a ``curvkit bench`` task name to overrides. Options the
            user passes win; ``recommended=False`` (optimizer or preconditioner) or a
            ready ``config=`` object skips them and leaves the configuration class's own
            field defaults (the paper's values).
    """

    name: str
    config_cls: type[MethodConfig]
    block_factory: Callable[..., Any]
    class_name: str | None = None
    summary: str = ""
    reference: str = ""
    sample_configs: tuple[dict[str, Any], ...] = ({},)
    bad_configs: tuple[tuple[dict[str, Any], type[Exception]], ...] = ()
    tied_blocks: bool = False
    diagonal_inputs: bool = False
    factor_statistics: bool = False
    statistics: str = "layer"
    schedule: Schedule = field(default_factory=Schedule)
    unitwise_block: Callable[..., Any] | None = None
    recommended: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def recommended_settings(self, task: str | None = None) -> dict[str, Any]:
        """A copy of :attr:`recommended` with the overrides of ``task`` (a ``curvkit
        bench`` task name) applied and the ``"tasks"`` entry removed."""
        out = copy.deepcopy(dict(self.recommended))
        per_task = out.pop("tasks", {}) or {}
        if task is not None:
            out.update(copy.deepcopy(per_task.get(task, {})))
        return out

    def recommended_options(self) -> dict[str, Any]:
        """The method options of :meth:`recommended_settings` (no optimizer options)."""
        return {k: v for k, v in self.recommended_settings().items() if k not in OPTIMIZER_OPTIONS}

    def __post_init__(self) -> None:
        if self.class_name is not None and not (
            isinstance(self.class_name, str) and self.class_name.isidentifier() and self.class_name[:1].isupper()
        ):
            raise ValueError(
                f"MethodSpec {self.name!r}: class_name={self.class_name!r} must be a Python identifier starting with "
                "an upper-case letter (the optimizer class curvkit.optim gives the method, e.g. 'KFAC'), or None."
            )
        if self.statistics not in ("layer", "gradient"):
            raise ValueError(
                f"MethodSpec {self.name!r}: statistics={self.statistics!r} must be 'layer' (captured inputs and output "
                "gradients) or 'gradient' (the step's gradient only)."
            )
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, MethodConfig)):
            raise TypeError(
                f"MethodSpec {self.name!r}: config_cls={self.config_cls!r} must be a MethodConfig subclass "
                "(StatisticsConfig or KroneckerConfig for a method that captures layer statistics)."
            )
        if self.statistics == "layer" and not issubclass(self.config_cls, StatisticsConfig):
            raise TypeError(
                f"MethodSpec {self.name!r}: a method with statistics='layer' needs a StatisticsConfig subclass (the "
                f"Fisher type and the capture options); {self.config_cls.__name__} is a plain MethodConfig. Subclass "
                "StatisticsConfig, or declare statistics='gradient' for a gradient-based method."
            )
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"MethodSpec {self.name!r}: schedule={self.schedule!r} must be a Schedule.")
        self.schedule.check(self.name, self.config_cls)

    def make_config(self, *, use_recommended: bool = True, **kwargs: Any) -> MethodConfig:
        """Build the configuration from ``kwargs`` on top of the recommended method
        options (``use_recommended=False``: on top of the configuration class's own
        defaults); unknown keywords raise a :class:`ConfigError` that lists the valid
        ones."""
        valid = {f.name for f in dataclasses.fields(self.config_cls) if f.init}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ConfigError(
                f"{self.name} configuration",
                [f"unknown option {k!r}; valid options: {', '.join(sorted(valid))}" for k in unknown],
            )
        if use_recommended:
            recommended = self.recommended_options()
            stray = sorted(set(recommended) - valid)
            if stray:
                raise ConfigError(
                    f"{self.name} recommended settings",
                    [
                        f"{k!r} is neither an optimizer option ({', '.join(sorted(OPTIMIZER_OPTIONS))}) nor an option "
                        f"of {self.config_cls.__name__} ({', '.join(sorted(valid))}); fix MethodSpec.recommended"
                        for k in stray
                    ],
                )
            kwargs = {**recommended, **kwargs}
        return self.config_cls(**kwargs)

    def check(self, config: MethodConfig, registry: Any) -> None:
        """Check the configuration's components against the registry (raises
        :class:`UnknownComponentError` or :class:`IncompatibleComponentsError`)."""
        if not isinstance(config, self.config_cls):
            raise TypeError(f"method {self.name!r} needs a {self.config_cls.__name__}, got {type(config).__name__}.")
        self.schedule.resolve(config, registry)  # a damping given by name: the registered strategy
        check = getattr(config, "check_components", None)
        if check is not None:
            try:
                check(registry)
            except (UnknownComponentError, IncompatibleComponentsError):
                raise

    def unsupported_reason(self, info: Any) -> str | None:
        """Why this method cannot build a block for ``info`` (``None`` if it can)."""
        if getattr(info, "tied", False) and not self.tied_blocks:
            return (
                f"its weight is tied in transposed layouts and method {self.name!r} needs per-row statistics, which "
                "such a block does not have (methods with tied_blocks=True: e.g. 'kfac', 'ekfac')"
            )
        if getattr(info, "diagonal_input", False) and not self.diagonal_inputs:
            from curvkit.stats.embedding import ONE_HOT_LIMIT

            if info.d_in > ONE_HOT_LIMIT:
                return (
                    f"it is an embedding with {info.d_in} rows and method {self.name!r} needs per-row input features: "
                    f"one-hot rows and a {info.d_in}×{info.d_in} input factor, which curvkit builds only up to "
                    f"ONE_HOT_LIMIT={ONE_HOT_LIMIT} rows (methods that keep its diagonal A at any size: e.g. 'kfac', "
                    "'ekfac')"
                )
        return None

    def make_block(self, info: Any, config: MethodConfig, registry: Any) -> Any:
        """The block for ``info``: the ``block_factory``'s, or for a unit-wise layer the
        ``unitwise_block`` factory's (default: the core's
        :class:`~curvkit.unitwise.UnitwiseBlock`).

        Raises:
            TypeError: The factory returned something that is not a
                :class:`~curvkit.blocks.CurvatureBlock` (naming the method, the layer and
                the returned type; :func:`curvkit.optim.checks.check_block`).
        """
        from curvkit.optim.checks import check_block

        if getattr(info, "unitwise", False):
            if self.unitwise_block is not None:
                return check_block(self.name, info, self.unitwise_block(info, config, registry), "unitwise_block")
            from curvkit.unitwise import UnitwiseBlock

            return UnitwiseBlock.from_config(info, config, registry)
        return check_block(self.name, info, self.block_factory(info, config, registry))
