"""Tasks and batches: the paper's SQL, Med and Fact tasks (hub or local files) and offline twins.

Typical use::

    data = load_task('sql', 'offline', size=1000, seed=0)          # or a hub name / local path
    encoded, stats = encode_records('sql', data.train, tokenizer, max_length=512)
    batches = BatchIterator(encoded, batch_size=8, pad_id=tokenizer.pad_token_id, seed=0)
    for batch in batches: ...                                       # int32 numpy arrays

See ``molf_jax/data/README.md`` for formats, prompts and how the offline tasks are built.
"""

# Loading records.
from molf_jax.data._tasks import OFFLINE, TaskData, load_task, offline_option_names
from molf_jax.data._offline_mcq import ProbeFact, forgetting_probe
from molf_jax.data._offline_sql import KINDS as SQL_KINDS
from molf_jax.data._sources import SourceSplits, read_source

# Prompt and target text.
from molf_jax.data._prompts import (
    OPTION_LETTERS,
    OPTION_TEXT,
    TASKS,
    Example,
    answers_with_text,
    correct_option,
    fact_example,
    fill_subject,
    med_example,
    med_prompt,
    option_texts,
    sql_example,
)
from molf_jax.data._authors_prompts import (
    AUTHORS_MED_TEMPLATE,
    AUTHORS_SQL_NO_CONTEXT_TEMPLATE,
    AUTHORS_SQL_TEMPLATE,
    authors_fact_prompt,
)
from molf_jax.data._render import eval_prompt, render_example

# Protocols: the authors' data preparation and scoring, or ours.
from molf_jax.data._protocol import (
    AUTHORS,
    MOLF_JAX,
    PROTOCOLS,
    SETTINGS as PROTOCOL_SETTINGS,
    ProtocolSettings,
    resolve_protocol,
)

# Tokenisation and batches.
from molf_jax.data._encode import (
    EncodedExample,
    EncodeStats,
    encode_example,
    encode_examples,
    encode_records,
    eval_prompt_ids,
    pad_token_id,
    prompt_ids,
    target_ids,
)
from molf_jax.data._batching import (Batch, BatchIterator, fixed_lengths,
                                     loss_token_budget, pad_right)

# An offline tokenizer for tiny models and tests.
from molf_jax.data._byte_tokenizer import byte_level_tokenizer

__all__ = [
    "AUTHORS",
    "AUTHORS_MED_TEMPLATE",
    "AUTHORS_SQL_NO_CONTEXT_TEMPLATE",
    "AUTHORS_SQL_TEMPLATE",
    "MOLF_JAX",
    "OFFLINE",
    "OPTION_LETTERS",
    "OPTION_TEXT",
    "ProbeFact",
    "SQL_KINDS",
    "PROTOCOLS",
    "PROTOCOL_SETTINGS",
    "ProtocolSettings",
    "TASKS",
    "Batch",
    "BatchIterator",
    "fixed_lengths",
    "loss_token_budget",
    "EncodeStats",
    "EncodedExample",
    "Example",
    "SourceSplits",
    "TaskData",
    "answers_with_text",
    "authors_fact_prompt",
    "byte_level_tokenizer",
    "correct_option",
    "encode_example",
    "encode_examples",
    "encode_records",
    "eval_prompt",
    "eval_prompt_ids",
    "fact_example",
    "fill_subject",
    "forgetting_probe",
    "load_task",
    "med_example",
    "med_prompt",
    "offline_option_names",
    "option_texts",
    "pad_right",
    "pad_token_id",
    "prompt_ids",
    "read_source",
    "resolve_protocol",
    "render_example",
    "sql_example",
    "target_ids",
]
