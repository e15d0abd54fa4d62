"""transformers: a durable KV cache and ``durable_generate``.

Protocol of one call ``durable_generate(model, input_ids, session_id=...)``:

1. Open (or create) the session; if it holds a previous run, check its
   fingerprint (model config and dtype, prompt, attention mask, generation
   arguments) and raise ``ResumeMismatchError`` naming what differs.
2. Preallocate one KV storage tensor ``[2 * layers, batch, kv_heads, max_len,
   head_dim]`` and a token buffer ``[batch, max_len]`` and register both as
   ``kv`` regions; on resume they are restored in place (no re-prefill: the
   cache holds ``len(tokens) - 1`` positions and ``generate`` feeds only the
   last token). With ``return_dict_in_generate`` and ``output_scores`` /
   ``output_logits``, also ``scores`` / ``logits`` regions ``[batch,
   max_new_tokens, vocab]`` (float32), one row per generated token.
3. ``model.generate(..., past_key_values=cache)`` with a stopping-criteria hook
   that, after each sampled token, commits an epoch every
   ``checkpoint_every`` tokens: the new KV rows, the new tokens, the RNG states
   (sampling resumes identically), the new score/logit rows if kept, and the
   token count. The invariant at that point is ``cache length == len(tokens) -
   1``. On the GPU the commit returns once its tasks are queued (the executor
   copies during the next step), and the executor stays resident across steps
   while ``generate`` runs (``Backend.resident``).
4. A final epoch marks the run done; calling again returns the stored result
   without running the model, as the same type: a tensor, or a
   ``GenerateDecoderOnlyOutput`` rebuilt from the regions (also what a resumed
   call returns, so its scores/logits cover every token, not only those since
   the resume).

Observing a call: ``durable_generate(..., on_event=f)`` calls ``f`` with a
:class:`GenerateEvent` at three points: ``"opened"`` (the session is open and
its lease held; nothing committed by this call yet), ``"token_committed"``
(after each epoch holding new tokens) and ``"done"`` (the final epoch is
durable; the session is not closed yet). It runs on the calling thread, inside
``generate`` for ``"token_committed"``. An exception it raises ends the call as
any failure does: the session is given back, or released resumable after this
call's commits, never marked closed.

Why a callback, and not environment variables or a test-only hook module: it is
an argument of one call, visible in the signature and typed, so no process-wide
switch lives in library code and no other call or thread is affected. Crash
tests and demo workers pass one that SIGKILLs the process at the point they
test (``os.kill(os.getpid(), signal.SIGKILL)`` at ``"token_committed"`` with
``n_generated >= N``, at ``"opened"``, or at ``"done"``); anyone else can use it
for progress, metrics or a supervisor's heartbeat.

The cache works with ``model.generate`` directly too (``DurableCache.for_model``;
to persist it, register ``cache.storage`` as a kv region with ``seq_axis=3``),
beam search included: build it with ``batch_size = batch * num_beams`` (the
batch ``generate`` runs); ``reorder_cache`` permutes the storage's rows in
place. A cache used with another batch size raises ``ConcordiaError`` at the
first forward, naming both.

Under tensor parallelism (``tp_plan="auto"``, one process per rank) each rank
logs its KV shard in its own session, and a resumed job starts every rank at
the newest token all their logs hold (``_tp``).

With ``cache_implementation="static"`` (``DurableStaticCache``) the epochs are
committed at model steps instead, on a GPU from inside the compiled step
(``_steps``). ``conversation_generate`` keeps one durable cache per
conversation across calls (``_conversation``).

Modules: ``_cache`` (DurableCache, DurableLayer, the static forms),
``_outputs`` (the per-step scores/logits regions and the dict output),
``_generate`` (the events, the fingerprint, the per-token checkpointer and
``durable_generate``), ``_steps`` (the per-step checkpointer and its custom
op), ``_conversation`` (conversations), ``_tp`` (tensor parallelism).
"""

from ._cache import DurableCache, DurableLayer, DurableStaticCache, DurableStaticLayer
from ._conversation import ConversationCall, ResidentConversations, conversation_generate
from ._generate import GenerateEvent, GeneratePhase, ResumeMismatchError, durable_generate

__all__ = ["ConversationCall", "DurableCache", "DurableLayer", "DurableStaticCache", "DurableStaticLayer",
           "GenerateEvent", "GeneratePhase", "ResidentConversations", "ResumeMismatchError", "conversation_generate",
           "durable_generate"]
