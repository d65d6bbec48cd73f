"""The receiver network data file."""

import json

import pytest

from heimdall.stations import load_network, network_from_dict

REFERENCE = {
    "giaveno": (45.02, 7.29, 600),
    "montanaro": (45.234, 7.857, 300),
    "torino": (45.044, 7.672, 250),
    "coazze": (45.03, 7.27, 700),
    "passo-del-giovi": (44.561, 8.956, 480),
    "genova": (44.395, 8.956, 100),
    "milano-baggio": (45.478, 9.123, 120),
}


def test_reference_network_matches_the_published_table():
    net = load_network()
    assert set(net.ids) == set(REFERENCE)
    for sid, (lat, lon, alt) in REFERENCE.items():
        st = net.get(sid)
        assert (st.latitude, st.longitude, st.altitude_m) == (lat, lon, alt)
        assert -60 < st.calibration_db < 0


def test_operator_file_overrides_the_packaged_network(tmp_path):
    data = json.loads(json.dumps(load_network().to_dict()))
    data["stations"][0]["calibration_db"] = -40.0
    path = tmp_path / "net.json"
    path.write_text(json.dumps(data))
    assert load_network(path).stations[0].calibration_db == -40.0


def test_centroid_is_the_mean_position():
    lat, lon = load_network().centroid
    assert lat == pytest.approx(sum(v[0] for v in REFERENCE.values()) / 7)
    assert lon == pytest.approx(sum(v[1] for v in REFERENCE.values()) / 7)


@pytest.mark.parametrize(
    "stations",
    [
        [{"id": "a", "latitude": 45, "longitude": 7}],  # no calibration
        [{"id": "a", "latitude": 95, "longitude": 7, "calibration_db": -30}],
    ],
)
def test_invalid_station_entries_are_refused(stations):
    with pytest.raises(ValueError):
        network_from_dict({"stations": stations})


def test_duplicate_station_ids_are_refused():
    st = {"id": "a", "latitude": 45, "longitude": 7, "calibration_db": -30}
    with pytest.raises(ValueError, match="twice"):
        network_from_dict({"stations": [st, st]})
