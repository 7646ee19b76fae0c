"""Data contracts: manifest schemas, validated I/O, lineage and the run layout.

Pure data code: importing it must never pull in torch, Prefect or Ray.
"""

from data_contracts.errors import ContractError
from data_contracts.layout import (
    ROUND_STAGES,
    STAGES,
    RealRoots,
    RunLayout,
    StageDir,
    check_run_name,
    inside_roots,
    server_state_dir,
)
from data_contracts.lineage import Lineage, cache_key, code_version, config_hash, table_hash
from data_contracts.manifest import (
    Manifest,
    ManifestRef,
    completed_ref,
    manifest_ref,
    read_manifest,
    read_marker,
    table_from_rows,
    validate,
    write_manifest,
    write_marker,
)
from data_contracts.schemas import CONTRACTS, Contract, contract

__all__ = [
    "CONTRACTS",
    "ROUND_STAGES",
    "STAGES",
    "Contract",
    "ContractError",
    "Lineage",
    "Manifest",
    "ManifestRef",
    "RealRoots",
    "RunLayout",
    "StageDir",
    "cache_key",
    "check_run_name",
    "code_version",
    "completed_ref",
    "config_hash",
    "contract",
    "inside_roots",
    "manifest_ref",
    "read_manifest",
    "read_marker",
    "server_state_dir",
    "table_from_rows",
    "table_hash",
    "validate",
    "write_manifest",
    "write_marker",
]
