"""The SEVIR data library.

- :mod:`pipeline.sevir.format`: catalog, HDF5 files, the VIL scale, safe paths, atomic outputs
  (its names are re-exported here, so ``from pipeline import sevir; sevir.read_catalog(...)`` works)
- sources: :mod:`pipeline.sevir.synthetic` (the embedded sample, with :mod:`pipeline.sevir._fields`),
  :mod:`pipeline.sevir.s3` (the public bucket), :mod:`pipeline.sevir.local` (a copy on disk, in place);
  :mod:`pipeline.sevir.selection` (years, event types), :mod:`pipeline.sevir.verify` (fetch's file check)
- :mod:`pipeline.sevir.windows`: events -> train/val/test window files (stage chunk)
- :mod:`pipeline.sevir.dataset`: the torch Dataset and DataLoader over those files
"""

from pipeline.sevir.format import (  # noqa: F401
    CATALOG_COLUMNS,
    CATALOG_NAME,
    EVENT_KINDS,
    FRAME_MINUTES,
    FRAMES,
    PROJ,
    REQUIRED_COLUMNS,
    SOURCE_ROOT_NAME,
    VIL_SIZE,
    VIL_THRESHOLDS,
    VilFile,
    atomic_dir,
    atomic_file,
    data_root_of,
    exclusive_lock,
    lock_path,
    read_catalog,
    safe_join,
    vil_file_name,
    vil_rows,
    vil_to_kgm2,
)
