"""Device profiles: classes and populations from YAML, drawn lazily per device.

A *class* (``device_profiles/classes/<name>.yaml``) gives one distribution per profile field
(:mod:`~raysim.emulation.profiles.distributions`) and an availability pattern
(:mod:`~raysim.emulation.profiles.availability`), each with a provenance tag and a source; a *population*
(``device_profiles/populations/<name>.yaml``) mixes classes with shares
(:mod:`~raysim.emulation.profiles.population`). :mod:`~raysim.emulation.profiles.reader` reads and checks the
files; :mod:`~raysim.emulation.profiles.command` is ``raysim profiles``. This package re-exports what callers use.
"""

from raysim.emulation.profiles.availability import AVAILABILITY, Availability, Constant, Diurnal
from raysim.emulation.profiles.command import profiles_command
from raysim.emulation.profiles.distributions import DISTRIBUTIONS, Choice, Distribution, Fixed, LogNormal
from raysim.emulation.profiles.population import FIELDS, DeviceClass, Population
from raysim.emulation.profiles.reader import (
    PROFILE_DIRS,
    SHIPPED_PROFILES,
    TAGS,
    is_shipped_population,
    list_profiles,
    load_class,
    load_population,
    load_profile,
    population_file,
)

__all__ = [
    "AVAILABILITY", "DISTRIBUTIONS", "FIELDS", "PROFILE_DIRS", "SHIPPED_PROFILES", "TAGS", "Availability", "Choice",
    "Constant", "DeviceClass", "Distribution", "Diurnal", "Fixed", "LogNormal", "Population", "is_shipped_population",
    "list_profiles", "load_class", "load_population", "load_profile", "population_file", "profiles_command",
]
