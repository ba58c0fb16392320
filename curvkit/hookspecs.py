"""The hook specifications through which plugins extend curvkit.

Every hook is a *set-up time* hook: it runs once, when a :class:`~curvkit.registry.Registry`
is built, and never during a training step. Each hook receives exactly one keyword
argument, a typed *register* object, and adds components to it (the registry-hook style
of tox 4)::

    import curvkit

    @curvkit.hookimpl
    def curvkit_register_layer_handlers(register):
        register.add(MyEmbeddingHandler())

Hooks are always called with keyword arguments, so a spec can grow new arguments in a
later version without breaking existing plugins (an implementation may accept only the
arguments it needs). A plugin is any module or object that carries such functions; it is
made known to curvkit through the ``curvkit`` entry-point group::

    [project.entry-points.curvkit]
    my_plugin = "my_package.plugin"

Groups, by what the component is for:

* statistics: :func:`curvkit_register_layer_handlers`,
  :func:`curvkit_register_statistics_backends`;
* method building blocks: :func:`curvkit_register_structures`,
  :func:`curvkit_register_inverters`, :func:`curvkit_register_inverses`,
  :func:`curvkit_register_dampings`;
* methods: :func:`curvkit_register_methods`.

Names must be unique across all loaded plugins; a second registration of a name raises
:class:`~curvkit.errors.DuplicateComponentError` naming both plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from curvkit.registry import (
        BackendRegister,
        DampingRegister,
        InverseRegister,
        InverterRegister,
        LayerHandlerRegister,
        MethodRegister,
        StructureRegister,
    )

__all__ = [
    "PROJECT_NAME",
    "curvkit_register_dampings",
    "curvkit_register_inverses",
    "curvkit_register_inverters",
    "curvkit_register_layer_handlers",
    "curvkit_register_methods",
    "curvkit_register_statistics_backends",
    "curvkit_register_structures",
    "hookimpl",
    "hookspec",
]

#: The pluggy project name, and the name of the entry-point group plugins register in.
PROJECT_NAME = "curvkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorator that marks a plugin function as an implementation of a curvkit hook.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- statistics -----------------------------------------------------------------------


@hookspec
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    """Register layer handlers: objects that turn a module's captured input and output
    gradient into the rows of its Kronecker factors.

    A handler is matched to a module by ``isinstance`` against its ``module_types``
    (the most specific registered type wins). See
    :class:`curvkit.stats.handlers.LayerHandler` for the contract.

    Args:
        register: Call ``register.add(handler)`` for each handler.
    """


@hookspec
def curvkit_register_statistics_backends(register: BackendRegister) -> None:
    """Register statistics backends: engines that compute Kronecker factors for a batch.

    A backend declares what it supports (Fisher types, approximations, module types,
    losses); a request outside that is refused with an error naming the backends that
    can serve it. See :class:`curvkit.stats.backend.StatisticsBackend`.

    Args:
        register: Call ``register.add(backend)`` for each backend.
    """


# --- method building blocks -----------------------------------------------------------


@hookspec
def curvkit_register_structures(register: StructureRegister) -> None:
    """Register factor structures (dense, diagonal, block-diagonal, Toeplitz, ...).

    Args:
        register: Call ``register.add(structure_cls)``; the class's ``name`` attribute
            is its registered name unless ``name=`` is given.
    """


@hookspec
def curvkit_register_inverters(register: InverterRegister) -> None:
    """Register inverters (Cholesky, eigendecomposition, randomized SVD, ...).

    Args:
        register: Call ``register.add(inverter_cls)``.
    """


@hookspec
def curvkit_register_inverses(register: InverseRegister) -> None:
    """Register the :class:`~curvkit.linalg.KroneckerInverse` classes a plugin's inverters
    or blocks return: a block's ``state_dict`` stores its cached inverse by ``kind``, and
    loading it looks the kind up here (:func:`~curvkit.linalg.inverse_from_state`).

    Args:
        register: Call ``register.add(inverse_cls)``; the class's ``kind`` is its name.
    """


@hookspec
def curvkit_register_dampings(register: DampingRegister) -> None:
    """Register damping strategies (frozen dataclasses: constant, pi-corrected, ...). A
    method configuration's ``damping`` may name one (``damping="exact"``, or
    ``{"name": "levenberg-marquardt", "initial": 10.0}``): the name is looked up here when
    the method is built (:meth:`~curvkit.methods.KroneckerConfig.check_components`).

    Args:
        register: Call ``register.add(damping_cls)``; the class's ``name`` is its name.
    """


# --- methods --------------------------------------------------------------------------


@hookspec
def curvkit_register_methods(register: MethodRegister) -> None:
    """Register preconditioning methods (K-FAC, EKFAC, SINGD, ...).

    Args:
        register: Call ``register.add(method_spec)``; a method spec carries its name,
            its configuration class and its block factory.
    """
