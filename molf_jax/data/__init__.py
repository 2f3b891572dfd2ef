"""Tasks and batches: the paper's SQL, Med and Fact tasks (hub or local files) and offline twins.

Typical use::

    data = load_task('sql', 'offline', size=1000, seed=0)          # or a hub name / local path
    encoded, stats = encode_records('sql', data.train, tokenizer, max_length=512)
    batches = BatchIterator(encoded, batch_size=8, pad_id=tokenizer.pad_token_id, seed=0)
    for batch in batches: ...                                       # int32 numpy arrays

See ``molf_jax/data/README.md`` for formats, prompts and how the offline tasks are built.
"""

# Loading records.
from molf_jax.data._tasks import OFFLINE, TaskData, load_task
from molf_jax.data._sources import SourceSplits, read_source

# Prompt and target text.
from molf_jax.data._prompts import (
    OPTION_LETTERS,
    TASKS,
    Example,
    fact_example,
    fill_subject,
    med_example,
    med_prompt,
    render_example,
    sql_example,
)

# Tokenisation and batches.
from molf_jax.data._encode import (
    EncodedExample,
    EncodeStats,
    encode_example,
    encode_examples,
    encode_records,
    prompt_ids,
    target_ids,
)
from molf_jax.data._batching import Batch, BatchIterator, pad_right

# An offline tokenizer for tiny models and tests.
from molf_jax.data._byte_tokenizer import byte_level_tokenizer

__all__ = [
    "OFFLINE",
    "OPTION_LETTERS",
    "TASKS",
    "Batch",
    "BatchIterator",
    "EncodeStats",
    "EncodedExample",
    "Example",
    "SourceSplits",
    "TaskData",
    "byte_level_tokenizer",
    "encode_example",
    "encode_examples",
    "encode_records",
    "fact_example",
    "fill_subject",
    "load_task",
    "med_example",
    "med_prompt",
    "pad_right",
    "prompt_ids",
    "read_source",
    "render_example",
    "sql_example",
    "target_ids",
]
