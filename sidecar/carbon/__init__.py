"""Carbon accounting: grid intensity (bundled table and live providers), PUE, embodied.

The public surface the CLI, server and metrics use; the modules behind it:
``intensity`` (the record), ``regions`` (bundled table, ``--region``), ``providers``
(live API clients), ``tracker`` (the intensity in force, refreshed, with fallback),
``emissions`` (pure SCI arithmetic), ``build`` (settings → tracker).
"""

from sidecar.carbon.build import CarbonConfigError, ProviderName, build_tracker
from sidecar.carbon.emissions import (
    DEFAULT_HOST_EMBODIED_KG,
    DEFAULT_LIFETIME_YEARS,
    EmbodiedModel,
    OperationalEmissions,
    gpu_embodied_default,
    joules_to_kwh,
    operational_grams,
    sci_per_unit,
)
from sidecar.carbon.intensity import Basis, Intensity, LiveSource, Source
from sidecar.carbon.providers import (
    ElectricityMapsProvider,
    IntensityProvider,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimitedError,
    ProviderRequestError,
    ProviderResponseError,
    ProviderServerError,
    ProviderTransientError,
    ProviderUnreachableError,
    UKProvider,
    WattTimeProvider,
)
from sidecar.carbon.regions import WORLD_KEY, Region, RegionError, RegionTable, bundled_table
from sidecar.carbon.tracker import CarbonIntensityTracker, IntensityChange

__all__ = [
    "DEFAULT_HOST_EMBODIED_KG",
    "DEFAULT_LIFETIME_YEARS",
    "WORLD_KEY",
    "Basis",
    "CarbonConfigError",
    "CarbonIntensityTracker",
    "ElectricityMapsProvider",
    "EmbodiedModel",
    "Intensity",
    "IntensityChange",
    "IntensityProvider",
    "LiveSource",
    "OperationalEmissions",
    "ProviderAuthError",
    "ProviderError",
    "ProviderName",
    "ProviderRateLimitedError",
    "ProviderRequestError",
    "ProviderResponseError",
    "ProviderServerError",
    "ProviderTransientError",
    "ProviderUnreachableError",
    "Region",
    "RegionError",
    "RegionTable",
    "Source",
    "UKProvider",
    "WattTimeProvider",
    "build_tracker",
    "bundled_table",
    "gpu_embodied_default",
    "joules_to_kwh",
    "operational_grams",
    "sci_per_unit",
]
