"""Policy names -> model files: the catalogue lives in :mod:`koopman_policy.catalog`; re-exported here so the
control stack has one import path for it."""

from koopman_policy.catalog import (
    CatalogError,
    PolicyEntry,
    UnknownPolicyError,
    find_root,
    load_catalog,
    resolve_policy,
)

__all__ = ["CatalogError", "PolicyEntry", "UnknownPolicyError", "find_root", "load_catalog", "resolve_policy"]
