"""The API bundle the bridge talks to: Kinova's ``kortex_api`` (imported lazily) or the stand-in.

Both expose the same names, so :class:`koopman_control.kortex.client.KortexClient` runs one code path for
the arm and for the stand-in; the ``backend`` parameter only chooses which module objects it gets.
"""

from __future__ import annotations

import collections
import collections.abc
from types import SimpleNamespace

BACKENDS = ("kortex", "standin")

KORTEX_WHEEL = "kortex_api-2.6.0.post3-py3-none-any.whl"
KORTEX_WHEEL_URL = (
    "https://artifactory.kinovaapps.com/artifactory/generic-public/kortex/API/2.6.0/" + KORTEX_WHEEL
)
INSTALL_HINT = (
    "Kinova's kortex_api is not installed. It is not on PyPI: download Kinova's wheel "
    f"{KORTEX_WHEEL} ({KORTEX_WHEEL_URL}, or from the Kinovarobotics/kortex releases), then\n"
    "    pip install 'protobuf==3.20.3' 'deprecated>=1.2.7'\n"
    f"    pip install {KORTEX_WHEEL} --no-deps\n"
    "Its generated *_pb2 modules need protobuf 3.20.x (protobuf >= 4 fails with 'Descriptors cannot be "
    "created directly'). Without an arm, start the stack against the MuJoCo stand-in of the arm: "
    "`ros2 launch koopman_control kinova.launch.py robot:=kortex-standin` or "
    "`koopman-control bringup --robot kortex-standin`."
)


class KortexApiMissingError(ImportError):
    """kortex_api cannot be imported; the message says how to install it."""


def load_api(backend: str) -> SimpleNamespace:
    """Module objects for ``backend`` ('kortex' or 'standin'); raises ValueError / KortexApiMissingError."""
    if backend == "standin":
        from koopman_control.kortex.standin.api import api_namespace

        return api_namespace()
    if backend != "kortex":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # kortex_api 2.6 still uses collections.MutableMapping (moved to collections.abc in Python 3.10).
    for name in ("MutableMapping", "MutableSequence", "Mapping", "Sequence"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    try:
        from kortex_api.autogen.client_stubs.BaseClientRpc import BaseClient
        from kortex_api.autogen.client_stubs.BaseCyclicClientRpc import BaseCyclicClient
        from kortex_api.autogen.messages import Base_pb2, BaseCyclic_pb2, Session_pb2
        from kortex_api.Exceptions.KClientException import KClientException
        from kortex_api.Exceptions.KServerException import KServerException
        from kortex_api.RouterClient import RouterClient, RouterClientSendOptions
        from kortex_api.SessionManager import SessionManager
        from kortex_api.TCPTransport import TCPTransport
        from kortex_api.UDPTransport import UDPTransport
    except ImportError as err:
        raise KortexApiMissingError(f"{INSTALL_HINT}\n(import error: {err})") from err
    except TypeError as err:  # protobuf >= 4 with the 3.x generated code
        raise KortexApiMissingError(f"kortex_api does not load with this protobuf: {err}\n{INSTALL_HINT}") from err
    return SimpleNamespace(
        name="kortex", TCPTransport=TCPTransport, UDPTransport=UDPTransport, RouterClient=RouterClient,
        RouterClientSendOptions=RouterClientSendOptions, SessionManager=SessionManager, BaseClient=BaseClient,
        BaseCyclicClient=BaseCyclicClient, Session_pb2=Session_pb2, Base_pb2=Base_pb2, BaseCyclic_pb2=BaseCyclic_pb2,
        errors=(KServerException, KClientException),
    )
