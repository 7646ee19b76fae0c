"""The one error type of the data contracts: what is wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class ContractError(ValueError):
    """A manifest (or a row of it) breaks its contract.

    The message always names the file, and the column and row when there is one, then the
    problem, then the fix — for example::

        `runs/a/ingest/manifest.parquet`, column `caption`, row 17: null value in a column
        that must not be null; give every video a caption or keep it with a `reason`
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        fix: str,
        column: str | None = None,
        row: int | None = None,
    ):
        self.path = str(path)
        self.column = column
        self.row = row
        self.problem = problem
        self.fix = fix
        where = f"`{self.path}`"
        if column is not None:
            where += f", column `{column}`"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}; {fix}")
