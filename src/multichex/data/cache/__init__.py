"""Prepared cache: any source known to :func:`read_source`, letterboxed once into a folder of PNGs.

One module per concept: :mod:`.layout` (file names, ids, PNGs), :mod:`.index` (``index.csv`` /
``errors.csv``), :mod:`.journal`, :mod:`.splits` (``split.json``), :mod:`.items` (one item, in a
worker), :mod:`.prepare` (:func:`prepare_cache`), :mod:`.summary` (``data info``) and :mod:`.dataset`
(:class:`PreparedDataset`). Every public name is re-exported here.

Layout of a cache folder ``DIR`` (written by :func:`prepare_cache`, read by :class:`PreparedDataset`):

``images/<id>.png``
    8-bit grayscale, ``size×size``: the source image after :func:`normalize_intensity` and
    :class:`Letterbox` — exactly the uint8 image :class:`CXRDataset` would build in memory.
``masks/<id>.png``
    0/255, ``size×size``, only for items whose source has a mask (an all-black mask is a known empty mask).
``index.csv``
    one row per item, sorted by ``id``; columns :data:`INDEX_COLUMNS`. List/dict cells hold JSON;
    an empty cell means "not known" (no mask, boxes not annotated, gate label unknown, no pixel spacing)
    while ``[]`` in ``boxes`` means "annotated, no lesion". ``findings`` holds only the labels the
    source gives (canonical name → 0/1); an absent key is NaN (unknown).
``split.json``
    patient-wise parts (ids per part), stratified as described in :func:`make_split`: for ``data info``
    and ``PreparedDataset(part=...)``. A training run does not use it: it splits a cache together with
    its other sources, with its own seed (``multichex.training.data.split_sources``).
``errors.csv``
    ``path,reason`` of every source item that could not be prepared (sorted by path).
``manifest.json``
    source, root, size, multichex version, creation time, counts, reader and preparation options.
``journal.jsonl``
    one JSON record per finished item, appended (and fsynced) after the item's files were
    written atomically; a rerun skips the items it lists, and ``index.csv`` is always rebuilt from
    it, so an interrupted and resumed run gives the same cache as an uninterrupted one.
"""

from multichex.data.cache.dataset import (
    ALL_TASKS,
    CachedRef,
    PreparedDataset,
    PreparedItem,
    cache_reader_options,
    cache_refs,
    cache_size,
)
from multichex.data.cache.index import (
    INDEX_COLUMNS,
    index_text,
    read_errors,
    read_index,
)
from multichex.data.cache.items import (
    DELAY_ENV,
    ItemResult,
    letterbox_ref,
    prepare_item,
)
from multichex.data.cache.journal import Journal
from multichex.data.cache.layout import (
    CACHE_FORMAT,
    ERRORS_NAME,
    INDEX_NAME,
    JOURNAL_NAME,
    MANIFEST_NAME,
    PNG_COMPRESS_LEVEL,
    SPLIT_NAME,
    item_id,
    png_bytes,
    read_png_u8,
    relative_path,
    remove_stale_temps,
)
from multichex.data.cache.prepare import PrepareResult, prepare_cache
from multichex.data.cache.splits import (
    DEFAULT_FRACTIONS,
    STRATIFY_RULE,
    gate_state,
    make_split,
    read_split,
)
from multichex.data.cache.summary import cache_summary

__all__ = [
    "ALL_TASKS",
    "CACHE_FORMAT",
    "DEFAULT_FRACTIONS",
    "DELAY_ENV",
    "ERRORS_NAME",
    "INDEX_COLUMNS",
    "INDEX_NAME",
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "PNG_COMPRESS_LEVEL",
    "SPLIT_NAME",
    "STRATIFY_RULE",
    "CachedRef",
    "ItemResult",
    "Journal",
    "PrepareResult",
    "PreparedDataset",
    "PreparedItem",
    "cache_reader_options",
    "cache_refs",
    "cache_size",
    "cache_summary",
    "gate_state",
    "index_text",
    "item_id",
    "letterbox_ref",
    "make_split",
    "png_bytes",
    "prepare_cache",
    "prepare_item",
    "read_errors",
    "read_index",
    "read_png_u8",
    "read_split",
    "relative_path",
    "remove_stale_temps",
]
