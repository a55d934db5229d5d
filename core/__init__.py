"""Dendritic layers, model families, exact parameter counts, datasets and fast trainers.

PyTorch only: no Optuna and no web code lives here.
"""

from __future__ import annotations

from . import (
    _bio,
    _dendritic_conv,
    _files,  # noqa: F401  (the npz: and folder: datasets)
    _growth,
    _models,  # noqa: F401  (registers the families)
    _population,
    _recurrent,
    _recurrent_population,
    _timeseries,
    _vision,
)
from ._analysis import (
    calculate_eigenvalues,
    dendritic_weight_image,
    figure_to_html,
    plot_dendritic_weights_full_model,
    plot_dendritic_weights_single_image,
    plot_eigenvalues,
    plot_training_curves,
)
from ._data import (
    FASHION_MNIST_SYSTEM_DIR,
    Dataset,
    DatasetInfo,
    dataset_info,
    list_datasets,
    load_dataset,
    normalize,
    read_idx,
    register_dataset,
    resolve_dataset_name,
    split_train_val,
    standardise,
    write_idx,
)
from ._layers import DendriticLayer, register_dendritic_hooks
from ._registry import (
    ModelFamily,
    analytic_parameter_count,
    count_parameters,
    create_model,
    data_params,
    get_family,
    list_models,
    register_model,
    seeded,
)
from ._train import (
    StepHook,
    TrainResult,
    compare_models,
    evaluate,
    make_optimizer,
    resolve_device,
    train_model,
)
from .exceptions import (
    CoreError,
    DatasetNotFoundError,
    DuplicateNameError,
    TrainingDivergedError,
    UnknownNameError,
)

__all__ = [
    "DendriticLayer",
    "register_dendritic_hooks",
    "create_model",
    "seeded",
    "list_models",
    "get_family",
    "register_model",
    "ModelFamily",
    "count_parameters",
    "analytic_parameter_count",
    "load_dataset",
    "list_datasets",
    "register_dataset",
    "Dataset",
    "DatasetInfo",
    "dataset_info",
    "resolve_dataset_name",
    "normalize",
    "standardise",
    "data_params",
    "read_idx",
    "write_idx",
    "split_train_val",
    "FASHION_MNIST_SYSTEM_DIR",
    "train_model",
    "compare_models",
    "evaluate",
    "make_optimizer",
    "resolve_device",
    "TrainResult",
    "StepHook",
    "calculate_eigenvalues",
    "plot_eigenvalues",
    "dendritic_weight_image",
    "plot_dendritic_weights_single_image",
    "plot_dendritic_weights_full_model",
    "plot_training_curves",
    "figure_to_html",
    "CoreError",
    "UnknownNameError",
    "DuplicateNameError",
    "DatasetNotFoundError",
    "TrainingDivergedError",
]
# The feature modules declare their public names in their own __all__.
from ._bio import *  # noqa: E402, F403
from ._dendritic_conv import *  # noqa: E402, F403
from ._growth import *  # noqa: E402, F403
from ._population import *  # noqa: E402, F403
from ._recurrent import *  # noqa: E402, F403
from ._recurrent_population import *  # noqa: E402, F403
from ._timeseries import *  # noqa: E402, F403
from ._vision import *  # noqa: E402, F403

__all__ += [
    *_bio.__all__,
    *_dendritic_conv.__all__,
    *_growth.__all__,
    *_population.__all__,
    *_recurrent.__all__,
    *_recurrent_population.__all__,
    *_timeseries.__all__,
    *_vision.__all__,
]
