"""A Kinova Gen3 stand-in: the part of ``kortex_api`` the bridge uses, served by the MuJoCo Gen3.

There is no arm here, so the package mirrors the API's module and class surface and the arm's behaviour that
matters for safety; the bridge's code path is therefore the one that runs against a real arm, only the module
objects differ (``backend: standin``). By role:

* :mod:`~koopman_control.kortex.standin.messages`: the ``Session_pb2`` / ``Base_pb2`` / ``BaseCyclic_pb2``
  look-alikes and the ``KServerException`` / ``KClientException`` errors;
* :mod:`~koopman_control.kortex.standin.robot`: :class:`StandinRobot`, the simulated arm with its servoing
  rules and the reach task it scores;
* :mod:`~koopman_control.kortex.standin.api`: transports, router, session manager, ``BaseClient``,
  ``BaseCyclicClient``, :func:`~koopman_control.kortex.standin.api.api_namespace`, and :func:`serve` /
  :func:`unserve` / :func:`robot_at`, where ``connect`` finds a robot by its IP address.

The robot and its registry are re-exported here for ``kortex_bridge_node``, which starts and serves one.
"""

from koopman_control.kortex.standin.api import robot_at, serve, unserve
from koopman_control.kortex.standin.robot import StandinRobot

__all__ = ["StandinRobot", "robot_at", "serve", "unserve"]
