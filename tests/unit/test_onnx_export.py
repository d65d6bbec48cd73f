"""ONNX export matches torch (needs the train extra; CI installs it)."""

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="torch is in the optional 'train' extra; not installed")

from heimdall.features import FeatureParams  # noqa: E402
from heimdall.simulate.dataset import build_dataset  # noqa: E402
from heimdall.simulate.families import TRAINING  # noqa: E402
from heimdall.stations import load_network  # noqa: E402
from heimdall.training.export import IR_VERSION, export_onnx  # noqa: E402
from heimdall.training.network import Localizer, gaussian_nll  # noqa: E402

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Localizer(7, FeatureParams().n_features, 64, mean_db=-110.0, std_db=15.0).eval()


def test_onnx_matches_torch_on_random_inputs(net, tmp_path):
    x = torch.randn(64, 7, 3) * 15.0 - 110.0
    mask = (torch.rand(64, 7) > 0.2).float()
    diff = export_onnx(net, 1.3, tmp_path / "m.onnx", x, mask)
    assert diff < 1e-4
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.ir_version == IR_VERSION
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "the batch axis must be dynamic"


def test_onnx_matches_torch_on_simulated_inputs(net, tmp_path):
    data = build_dataset(64, 4, load_network(), TRAINING, FeatureParams(), chunk=64)
    x = data.x.astype(np.float32)
    diff = export_onnx(
        net, 1.0, tmp_path / "m.onnx", torch.from_numpy(x), torch.from_numpy(data.mask)
    )
    assert diff < 1e-4


def test_gaussian_nll_known_value():
    mean = torch.zeros(1, 2)
    unc = torch.tensor([[1.0, 1.0, 0.0]])
    # Standard bivariate normal at the origin: -log(1 / (2 pi)) = log(2 pi).
    assert float(gaussian_nll(mean, unc, torch.zeros(1, 2))) == pytest.approx(np.log(2 * np.pi))
    # Correlation lowers the NLL of a point along the correlated direction.
    corr = torch.tensor([[1.0, 1.0, 0.8]])
    point = torch.tensor([[1.0, 1.0]])
    assert float(gaussian_nll(mean, corr, point)) < float(gaussian_nll(mean, unc, point))
