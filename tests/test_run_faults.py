"""Loading weights that do not fit the network (a checkpoint of another architecture) is one line naming
the file (medexp.run.restore.load_weights), used by resume, evaluate and predict; docs/faults.md."""

from __future__ import annotations

import pytest
from torch import nn

from medexp.errors import DataError
from medexp.run.restore import load_weights


def test_weights_of_another_architecture_are_one_line():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Conv3d(4, 2, 1))
    other = nn.Sequential(nn.Conv3d(1, 8, 3), nn.Conv3d(8, 2, 1)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch") as raw:  # control: torch's own message
        net.load_state_dict(other)
    assert len(str(raw.value).splitlines()) > 1, "several lines, raised as a programming error"
    with pytest.raises(DataError) as err:
        load_weights(net, other, "runs/x/checkpoints/last.pt")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("runs/x/checkpoints/last.pt: its weights do not fit the network")
    assert "size mismatch for 0.weight" in message
    missing = {k: v for k, v in net.state_dict().items() if not k.startswith("1.")}
    with pytest.raises(DataError, match=r"last.pt: .*Missing key"):
        load_weights(net, missing, "last.pt")
