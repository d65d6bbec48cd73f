"""The receiver network: station ids, positions and power calibration.

The network is data, not code: it is read from a JSON file (the packaged
reference network by default, or ``HEIMDALL_STATIONS_FILE``), so an operator can
move a receiver or correct its calibration without a release.

Calibration convention (see docs/iq-input.md)::

    received_power_dbm = iq_power_dbfs + calibration_db
    iq_power_dbfs      = 10 * log10(mean(|x|^2))     # |x| = 1 is 0 dBFS
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Station:
    """One WebSDR receiver."""

    id: str
    name: str
    latitude: float
    longitude: float
    altitude_m: float
    calibration_db: float
    """Add to IQ power in dBFS to get received power in dBm."""


@dataclass(frozen=True)
class Network:
    """An ordered set of receivers."""

    name: str
    stations: tuple[Station, ...]

    def __post_init__(self) -> None:
        ids = [s.id for s in self.stations]
        if len(set(ids)) != len(ids):
            raise ValueError(f"network {self.name!r} lists a station twice: {ids}")
        if not ids:
            raise ValueError(f"network {self.name!r} has no stations")

    @property
    def ids(self) -> tuple[str, ...]:
        """Station ids in file order."""
        return tuple(s.id for s in self.stations)

    def __contains__(self, station_id: object) -> bool:
        return any(s.id == station_id for s in self.stations)

    def get(self, station_id: str) -> Station:
        """The station with this id (KeyError when absent)."""
        for s in self.stations:
            if s.id == station_id:
                return s
        raise KeyError(station_id)

    @property
    def centroid(self) -> tuple[float, float]:
        """Mean latitude and longitude, degrees: the origin of the local plane."""
        lat = float(np.mean([s.latitude for s in self.stations]))
        lon = float(np.mean([s.longitude for s in self.stations]))
        return lat, lon

    def calibration(self, slots: tuple[str, ...] | list[str]) -> np.ndarray:
        """Calibration offsets (dB) in the given slot order."""
        return np.array([self.get(s).calibration_db for s in slots], dtype=np.float64)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (as stored in a model card)."""
        return {
            "network": self.name,
            "stations": [
                {
                    "id": s.id,
                    "name": s.name,
                    "latitude": s.latitude,
                    "longitude": s.longitude,
                    "altitude_m": s.altitude_m,
                    "calibration_db": s.calibration_db,
                }
                for s in self.stations
            ],
        }


def network_from_dict(data: dict[str, object]) -> Network:
    """Build a network from its JSON form, checking every field."""
    raw = data.get("stations")
    if not isinstance(raw, list):
        raise ValueError("network file needs a 'stations' list")
    stations = []
    for i, item in enumerate(raw):
        try:
            stations.append(
                Station(
                    id=str(item["id"]),
                    name=str(item.get("name", item["id"])),
                    latitude=float(item["latitude"]),
                    longitude=float(item["longitude"]),
                    altitude_m=float(item.get("altitude_m", 0.0)),
                    calibration_db=float(item["calibration_db"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"station #{i} in network file is invalid: {exc!r}") from exc
        st = stations[-1]
        if not (-90 <= st.latitude <= 90 and -180 <= st.longitude <= 180):
            raise ValueError(f"station {st.id!r} has an impossible position")
    return Network(name=str(data.get("network", "unnamed")), stations=tuple(stations))


def load_network(path: Path | str | None = None) -> Network:
    """Read a network file; ``None`` reads the packaged reference network."""
    if path is None:
        text = resources.files("heimdall").joinpath("data/stations.json").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return network_from_dict(json.loads(text))
