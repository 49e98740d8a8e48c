"""Mutation testing: put named bugs into a copy of the code, one at a time, and require the tests to catch each.

Every mutation (MUTATIONS in this file; see --list) is an exact text replacement (old -> new) in one library file, with the tests that must
fail because of it. For each mutation the repository's files (git's tracked and untracked-but-not-ignored
files, as they are in the working tree) are copied to a temporary directory, the bug is put in, and only its
tests run there (PYTHONPATH pointing at the copy); the working tree is never touched. The listed tests first
run once unmutated and must pass, or no kill would mean anything. A mutation whose old text is no longer in
its file is an error, so a refactor cannot quietly switch a mutation off: update the mutation instead.

The whole list (what `make mutation` runs; exit 1 if any mutation survives):
    python tools/mutation.py
Seconds: one mutation, its tests only:
    python tools/mutation.py --only recall-divided-by-k
List the mutations and their tests:
    python tools/mutation.py --list
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common.errors import UserError, one_line_errors

REPO = Path(__file__).resolve().parent.parent  # the tree that is copied and mutated, wherever this runs from

B = "tests/test_behaviour.py::"
IR = "tests/test_import_routing.py::"
RR = "tests/test_routing_report.py::"
W = "tests/test_window.py::"
E = "tests/test_engine.py::"
G = "tests/test_guidance.py::"
A = "tests/test_attacks.py::"
EH = "tests/test_engine_host.py::"
RO = "tests/test_routing_only.py::"
# the report rule (common/paths.py not_a_report): every report flag of every script, and the rules by hand
REPORT = (A + "test_a_report_flag_never_replaces_what_is_not_an_earlier_report",
          A + "test_an_earlier_report_is_replaced_and_the_rules_by_hand")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]   # pytest node ids that must fail (at least one) with the mutation in place
    why: str                 # the real bug it stands for
    traces: bool = False     # its tests read the tiny traces (built once per run, shared read-only)


MUTATIONS = [
    # --- the five defects found on 2026-11-28 (all passed the suite together before these tests existed)
    Mutation("optimizer-never-steps", "training/trainer.py", "opt.step()", "pass",
             (B + "test_training_lowers_the_loss_and_beats_popularity",),
             "training computes gradients but never applies them", traces=True),
    Mutation("router-reuse-own-layer", "validation/coverage/scorers.py", "m, t = layer == l, l + self.lookahead",
             "m, t = layer == l, l",
             (B + "test_router_reuse_is_the_target_layers_router",
              "tests/test_pipeline.py::test_baselines_at_lookahead_1_equal_a_hand_computation"),
             "router reuse applies layer l's router instead of layer l+d's", traces=True),
    Mutation("layer-aware-ignores-lookahead", "models/predictors.py",
             "target = f.layer + self.cfg.lookahead\n        z = self.layer_emb(target) if",
             "target = f.layer\n        z = self.layer_emb(target) if",
             (B + "test_layer_aware_head_follows_the_lookahead",),
             "the layer-aware predictor uses the input layer's head, whatever the lookahead"),
    Mutation("previous-token-ignores-previous", "validation/coverage/scorers.py", "block.prev[tok], E)",
             "torch.full_like(tok, -1), E)", (B + "test_previous_token_is_the_previous_tokens_experts",),
             "the previous-token baseline never looks at the previous token (popularity only)"),
    Mutation("hybrid-own-routing-zeroed", "models/features.py",
             "f.own_routing = routing_vector(block, last_seen, tok, num_experts).to(dtype)",
             "f.own_routing = torch.zeros_like(routing_vector(block, last_seen, tok, num_experts)).to(dtype)",
             (B + "test_every_input_of_the_hybrid_changes_its_output",
              B + "test_features_are_the_routing_already_observed"),
             "the hybrid's own-routing feature is all zeros"),
    # --- features and predictors
    Mutation("hybrid-ignores-previous-token", "models/predictors.py",
             "z = z + self.own_proj(f.own_routing) + self.prev_proj(f.prev_token)",
             "z = z + self.own_proj(f.own_routing)", (B + "test_every_input_of_the_hybrid_changes_its_output",),
             "the hybrid drops the previous token's routing"),
    Mutation("hybrid-previous-token-wrong-layer", "models/features.py",
             "f.prev_token = routing_vector(block, target, block.prev[tok], num_experts)",
             "f.prev_token = routing_vector(block, layer, block.prev[tok], num_experts)",
             (B + "test_features_are_the_routing_already_observed",),
             "the previous token's routing is read at the input layer, not the target layer"),
    Mutation("future-leak-own-routing-at-d0", "models/features.py",
             "last_seen = layer if lookahead >= 1 else layer - 1", "last_seen = layer", ("tests/test_leakage.py::test_no_future_information_reaches_the_prediction",
                              B + "test_features_are_the_routing_already_observed"),
             "at d = 0 the hybrid sees layer l's own routing, i.e. the answer"),
    # --- the anchored predictor's features: each leak must trip the leakage test
    Mutation("future-leak-window-includes-token", "models/features.py",
             "back = [earlier_token(block, tok, j) for j in range(1, spec.window + 1)]",
             "back = [earlier_token(block, tok, j) for j in range(0, spec.window)]",
             ("tests/test_leakage.py::test_no_future_information_reaches_the_prediction",),
             "the window of previous tokens at layer l+d starts at token t itself: its MoE input at l+d (d >= 1) "
             "and its routing there, the answer"),
    Mutation("future-leak-past-layers-read-later", "models/features.py", "hidden_at(block, layer - j, tok, dtype)",
             "hidden_at(block, layer + j, tok, dtype)",
             ("tests/test_leakage.py::test_no_future_information_reaches_the_prediction",),
             "the 'past layers' feature reads this token's MoE inputs at layers l+1.., not yet computed"),
    Mutation("future-leak-next-token-id", "models/features.py", "f.token_id = block.token_ids[tok]",
             "f.token_id = block.token_ids[(tok + 1).clamp(max=block.tokens - 1)]",
             ("tests/test_leakage.py::test_no_future_information_reaches_the_prediction",),
             "the token-id feature is the next token's id (a shifted index)"),
    Mutation("future-leak-context-includes-token", "collection/traces/rows.py",
             "total = prefix[s, tok] - prefix[s, tok - n]",
             "total = prefix[s, (tok + 1).clamp(max=block.tokens - 1)] - prefix[s, tok - n]",
             ("tests/test_leakage.py::test_no_future_information_reaches_the_prediction",),
             "the context mean at layer l+d runs to token t itself (an off-by-one in the prefix sums)"),
    Mutation("train-split-reads-whole-tensor", "collection/traces/rows.py",
             "return float(runs[:, 1].mean()) * row < RANGE_MIN_BYTES", "return True",
             ("tests/test_hidden_format.py::test_most_of_a_shard_reads_long_ranges_only_and_equals_the_whole_read",),
             "a training split reads every split's hidden rows, then drops a fifth of them on the device"),
    Mutation("warm-up-step-kept", "training/trainer.py", "    model.load_state_dict(weights)\n", "",
             ("tests/test_anchored.py::test_an_undone_warm_up_step_leaves_weights_optimiser_and_rng_as_they_were",
              "tests/test_behaviour.py::test_the_warm_up_step_changes_nothing_training_learns"),
             "the trainer's warm-up step stays in the weights: every run trains one extra step on its first sequences"),
    Mutation("warm-up-optimiser-state-kept", "training/trainer.py", "    opt.load_state_dict(state)\n", "",
             ("tests/test_anchored.py::test_an_undone_warm_up_step_leaves_weights_optimiser_and_rng_as_they_were",
              "tests/test_behaviour.py::test_the_warm_up_step_changes_nothing_training_learns"),
             "the warm-up step's Adam moments and step count stay in the optimiser"),
    Mutation("warm-up-consumes-rng", "training/trainer.py",
             'with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):',
             "if True:",
             ("tests/test_anchored.py::test_an_undone_warm_up_step_leaves_weights_optimiser_and_rng_as_they_were",
              "tests/test_behaviour.py::test_the_warm_up_step_changes_nothing_training_learns"),
             "the warm-up step's dropout draws move the random stream every later step sees"),
    Mutation("commit-hashes-in-process", "collection/traces/durable.py", "digest = self.pool.submit(self.hasher.sha256, tmp)",
             "digest = self.pool.submit(sha256_of, tmp)",
             ("tests/test_durable.py::test_commits_hash_in_helper_processes_not_in_this_one",),
             "shards are hashed on this process's threads, which take the GIL from the thread feeding the GPU"),
    Mutation("hash-helper-drops-a-byte", "collection/traces/durable.py", "                h.update(view[:n])\n        print",
             "                h.update(view[:n - 1])\n        print",
             ("tests/test_durable.py::test_helper_processes_hash_like_hashlib_and_report_errors",),
             "the helper process hashes all but the last byte of every chunk"),
    Mutation("dead-hash-helper-answers-empty", "collection/traces/durable.py",
             "        self._drop(p)  # it died", "        return \"\"  # it died",
             ("tests/test_durable.py::test_a_helper_that_died_is_dropped_and_its_file_hashed_here",),
             "a helper that died answers an empty digest, which the manifest would record"),
    Mutation("write-jobs-ignore-bytes", "collection/capture.py",
             "return max(1, min(threads, slices, -(-nbytes // WRITE_BYTES_PER_JOB)))",
             "return max(1, min(threads, slices))",
             ("tests/test_capture.py::test_write_jobs_one_per_96_mib_of_a_batch_at_most_the_threads",),
             "every batch is written by all the writer threads, however few its bytes"),
    Mutation("hash-helper-dies-on-ctrl-c", "collection/traces/durable.py", 'encoding="utf-8", start_new_session=True)',
             'encoding="utf-8")', ("tests/test_durable.py::test_helpers_run_outside_the_terminals_process_group",),
             "Ctrl-C in the terminal kills the hashing helpers with a traceback each, mid-commit"),
    Mutation("reader-threads-ignore-torchrun", "collection/traces/staging.py", "cores // processes // 2", "cores // 2",
             ("tests/test_hidden_format.py::test_reader_threads_are_half_the_usable_cores_from_4_to_12",),
             "under torchrun every process starts half the node's cores as reader threads"),
    Mutation("warm-up-reads-every-shard", "training/trainer.py",
             'first_shards = np.unique(table["shard"][is_train])[:args.shards_per_group]',
             'first_shards = np.unique(table["shard"][is_train])',
             ("tests/test_behaviour.py::test_the_warm_up_step_is_no_larger_than_a_real_step",),
             "the warm-up takes a step's worth of sequences from every shard: a larger step than training ever takes"),
    # --- the anchored predictor's starting point and its per-layer fallback
    Mutation("anchored-init-not-zero", "models/predictors.py", "self.delta_w = nn.Parameter(torch.zeros(L, d, H))",
             "self.delta_w = nn.Parameter(torch.randn(L, d, H) * 0.05)",
             ("tests/test_anchored.py::test_before_training_it_is_the_router_and_router_reuse",
              "tests/test_anchored.py::test_before_training_every_row_picks_the_routers_experts"),
             "the predicted-state head starts random: the predictor no longer starts as the router (d = 0) or "
             "router reuse (d >= 1)", traces=True),
    Mutation("anchored-fallback-never-applied", "training/trainer.py",
             "reuse[key][t] is not None and reuse[key][t] > learned[t]]",
             "reuse[key][t] is not None and reuse[key][t] > learned[t] and False]",
             ("tests/test_anchored.py::test_fallback_layers_are_router_reuse_exactly",),
             "--layer-fallback never resets a layer: layers the training made worse than router reuse stay worse",
             traces=True),
    Mutation("anchored-reset-keeps-heads", "models/predictors.py", "getattr(self, name)[target].zero_()", "pass",
             ("tests/test_anchored.py::test_fallback_layers_are_router_reuse_exactly",),
             "the fallback resets nothing: a layer reported as router reuse keeps its trained heads", traces=True),
    # --- metrics and the evaluation loop
    Mutation("ranks-ties-favour-predictor", "validation/coverage/metrics.py",
             ">= s_true).sum(2, dtype=torch.int16).long() - 1", "> s_true).sum(2, dtype=torch.int16).long()",
             ("tests/test_metrics.py::test_ranks_follow_scores_and_ties_count_against_the_prediction",),
             "tied scores are ranked in the predictor's favour (constant scores would look perfect)"),
    Mutation("recall-divided-by-k", "validation/coverage/metrics.py", 'out[f"recall@{k}"] = found / (rows * self.K)',
             'out[f"recall@{k}"] = found / (rows * k)', ("tests/test_metrics.py::test_accumulator_hand_computed_at_every_k",),
             "recall@k divides by k instead of K (agrees only at k = K)"),
    Mutation("coverage-from-best-rank", "validation/coverage/metrics.py", "torch.bincount(cell + ranks.max(1).values",
             "torch.bincount(cell + ranks.min(1).values",
             ("tests/test_metrics.py::test_accumulator_hand_computed_at_every_k",
              "tests/test_metrics.py::test_accumulator_matches_direct_metrics_and_splits_by_layer_and_source"),
             "coverage@k counts a row covered when its best true expert is in the top-k (that is any_hit)"),
    Mutation("targets-ignore-lookahead", "collection/traces/rows.py", "return block.topk_ids[layer + lookahead, tok]",
             "return block.topk_ids[layer, tok]", (B + "test_router_reuse_is_the_target_layers_router",
                                                   B + "test_previous_token_is_the_previous_tokens_experts"),
             "every lookahead is scored against layer l's experts"),
    Mutation("rows-counted-at-input-layer", "validation/coverage/evaluate.py", "acc.update(ranks, layer + lookahead,",
             "acc.update(ranks, layer,", (B + "test_router_reuse_is_the_target_layers_router",),
             "per-layer metrics are filed under the input layer instead of the target layer"),
    # --- the row loader and the split
    Mutation("prev-crosses-sequences", "collection/traces/rows.py", "np.where(pos > 0,", "np.where(pos >= 0,",
             (B + "test_rows_know_each_tokens_previous_token", B + "test_previous_token_is_the_previous_tokens_experts"),
             "a sequence's first token gets the previous sequence's last token as its previous token"),
    Mutation("sequence-start-not-masked", "collection/traces/rows.py", "return out * valid.unsqueeze(1)", "return out",
             (B + "test_previous_token_is_the_previous_tokens_experts", B + "test_features_are_the_routing_already_observed"),
             "a missing row (-1: sequence start, layer before 0) reads row 0's routing instead of nothing"),
    Mutation("split-sequence-in-two-splits", "collection/traces/rows.py", 'out["val"].append(ids[n_test:n_test + n_val])',
             'out["val"].append(ids[max(n_test - 1, 0):n_test + n_val])',
             (B + "test_split_is_a_seeded_stratified_partition",),
             "one sequence per source is in both the test and the validation split"),
    # --- baselines
    Mutation("popularity-wrong-layer", "validation/coverage/scorers.py",
             "lambda block, tok, layer: popularity[layer + lookahead]", "lambda block, tok, layer: popularity[layer]",
             (B + "test_popularity_counts_the_training_split_at_the_target_layer",),
             "popularity ranks the input layer's experts, not the target layer's"),
    Mutation("popularity-counts-every-split", "validation/coverage/scorers.py",
             "popularity = expert_popularity(ts, train_ids).to(device)\n    return lambda",
             'popularity = expert_popularity(ts, ts.sequence_table()["seq_id"]).to(device)\n    return lambda',
             (B + "test_popularity_counts_the_training_split_at_the_target_layer",),
             "popularity is counted on every split, the evaluated one included"),
    # --- the trace format and atomic writes
    Mutation("reader-skips-checksum", "collection/traces/format.py", "if verify and sha256_fd(fd) != sha256:",
             "if False and sha256_fd(fd) != sha256:",
             (B + "test_a_changed_byte_in_a_shard_is_refused",
              "tests/test_format.py::test_trace_set_verifies_checksums_and_sizes"),
             "a shard whose bytes changed is read without complaint", traces=True),
    Mutation("reader-refuses-adjacent-tensors", "collection/traces/format.py", "if b1 < e0:", "if b1 <= e0:",
             ("tests/test_fuzz_reader.py::test_any_valid_file_reads_back_exactly",
              "tests/test_fuzz_reader.py::test_any_valid_trace_set_opens_and_reads_back_exactly"),
             "the reader refuses valid files (tensors that touch look overlapping); the damage fuzzers still pass"),
    Mutation("writer-ignores-row-offset", "collection/traces/format.py", "+ row * strides[lead]", "+ row",
             ("tests/test_fuzz_reader.py::test_any_valid_file_reads_back_exactly",
              "tests/test_format.py::test_shard_round_trip_and_safetensors_compatibility"),
             "a batch written at row r of a multi-column tensor lands at element r"),
    Mutation("atomic-write-in-place", "common/atomic.py", "tmp = path.with_name(path.name + PARTIAL_SUFFIX)",
             "tmp = path", (B + "test_a_failed_write_keeps_the_old_file_and_leaves_nothing",),
             "files are written in place: a failed write destroys the old file"),
    Mutation("atomic-failure-leaves-partial", "common/atomic.py", "    except BaseException as e:\n        tmp.unlink(missing_ok=True)",
             "    except BaseException as e:\n        pass",
             (B + "test_a_failed_write_keeps_the_old_file_and_leaves_nothing",),
             "a failed write leaves its .partial file behind"),
    Mutation("atomic-keeps-private-mode", "common/atomic.py", "os.chmod(tmp, FILE_MODE)", "pass",
             (B + "test_written_files_get_the_normal_mode",),
             "files created private (0600) by a writer stay unreadable to the other users of a trace directory"),
    # --- capture
    Mutation("capture-keeps-padding-rows", "collection/capture.py", "rows_index = flat_mask.nonzero().squeeze(1)",
             "rows_index = torch.arange(int(flat_mask.sum()))",
             ("tests/test_capture.py::test_captured_rows_are_the_models_own_routing",),
             "capture keeps the first N rows of the padded batch (padding in, real tokens out) instead of the real ones"),
    # --- the expert-cache simulator
    Mutation('lru-evicts-newest', 'validation/prefetch/simulator.py', 'age = touched[l, e]',
             'age = -touched[l, e]',
             ('tests/test_prefetch.py::test_eviction_rules_give_the_hand_worked_hits',),
             'LRU evicts the most recently used expert'),
    Mutation('pins-ignored', 'validation/prefetch/simulator.py', '        if slot_pin[l, s] == stamp:\n            continue',
             '        if False:\n            continue',
             ('tests/test_prefetch.py::test_an_access_never_evicts_its_own_experts',),
             'an access evicts an expert the same layer is about to use'),
    Mutation('lfu-key-is-lru', 'validation/prefetch/simulator.py', '        return float(freq[l, e])',
             '        return 0.0',
             ('tests/test_prefetch.py::test_eviction_rules_give_the_hand_worked_hits',),
             'LFU evicts by recency'),
    Mutation('belady-key-is-lru', 'validation/prefetch/simulator.py', '        return -float(nxt[l, e])',
             '        return 0.0',
             ('tests/test_prefetch.py::test_eviction_rules_give_the_hand_worked_hits',),
             "Belady's bound evicts by recency"),
    Mutation('late-prefetch-no-stall', 'validation/prefetch/simulator.py', '                        wait = max(wait, arrive[l, e])\n',
             '                        pass\n',
             ('tests/test_prefetch.py::test_a_late_prefetch_stalls_exactly_its_remaining_time',),
             'a prefetch still in flight counts as a hit with no stall'),
    Mutation('demand-not-fifo', 'validation/prefetch/simulator.py',
             'q = max(r, link_free) + (prm[P_LOWCOPY] if miss == LOWBIT else copy_ms)',
             'q = r + (prm[P_LOWCOPY] if miss == LOWBIT else copy_ms)',
             ('tests/test_prefetch.py::test_a_wrong_prefetch_delays_the_demand_fetch_behind_it_and_counts_as_wasted',),
             'a demand fetch overtakes copies already on the one copy engine'),
    Mutation('prefetch-not-fifo', 'validation/prefetch/simulator.py', 'q = max(issue, link_free) + copy_ms',
             'q = issue + copy_ms',
             ('tests/test_prefetch.py::test_a_late_prefetch_stalls_exactly_its_remaining_time',),
             'prefetches overlap each other on the one copy engine'),
    Mutation('shared-does-not-overlap', 'validation/prefetch/simulator.py', 'ready = r + p + evict_ms + shared_ms',
             'ready = r + p + evict_ms',
             ('tests/test_prefetch.py::test_a_wrong_prefetch_delays_the_demand_fetch_behind_it_and_counts_as_wasted',),
             "the shared expert's time is dropped"),
    Mutation('predictor-free', 'validation/prefetch/simulator.py', 'issue = r + p\n',
             'issue = r\n',
             ('tests/test_prefetch.py::test_a_prefetch_leaves_when_the_predictor_is_done',),
             "the predictor's own time is not counted"),
    Mutation('stall-not-counted', 'validation/prefetch/simulator.py',
             'stats[t, STALL_MS] += end - (ready + n_gpu * expert_ms)', 'stats[t, STALL_MS] += 0.0',
             ('tests/test_prefetch.py::test_a_late_prefetch_stalls_exactly_its_remaining_time',),
             'stalls are not reported'),
    Mutation('expert-time-dropped', 'validation/prefetch/simulator.py', 'end = wait + n_gpu * expert_ms',
             'end = wait',
             ('tests/test_prefetch.py::test_a_late_prefetch_stalls_exactly_its_remaining_time',),
             "routed experts' compute is free"),
    Mutation('unused-at-end-not-wasted', 'validation/prefetch/simulator.py', '            if pending[l, e]:\n                stats[T - 1, SPEC_WASTED] += 1',
             '            if pending[l, e]:\n                pass',
             ('tests/test_prefetch.py::test_byte_accounting_balances',),
             'prefetched experts never used by the end are not counted as wasted bytes'),
    Mutation('evicted-speculative-not-wasted', 'validation/prefetch/simulator.py', '                                if pending[l, old]:\n                                    stats[t, SPEC_WASTED] += 1',
             '                                if pending[l, old]:\n                                    pass',
             ('tests/test_prefetch.py::test_a_wrong_prefetch_delays_the_demand_fetch_behind_it_and_counts_as_wasted',),
             'a prefetched expert evicted unused is not counted as wasted'),
    Mutation('static-inserts', 'validation/prefetch/simulator.py',
             'if rule != STATIC and rule != WINDOW and cap[l] > 0:', 'if cap[l] > 0:',
             ('tests/test_prefetch.py::test_static_popular_keeps_its_experts_and_stages_the_rest',),
             'static-popular replaces its pinned experts'),
    Mutation('hit-not-used', 'validation/prefetch/simulator.py', '                        stats[t, SPEC_USED] += 1\n',
             '',
             ('tests/test_prefetch.py::test_a_prefetch_leaves_when_the_predictor_is_done',),
             'a used prefetch is not counted as used bytes'),
    Mutation('token-time-dropped', 'validation/prefetch/simulator.py', '        now += prm[P_TOKEN]\n',
             '',
             ('tests/test_prefetch.py::test_shared_expert_hides_part_of_a_demand_fetch_and_token_time_adds_up',),
             'the per-token time outside MoE layers is dropped'),
    Mutation('locality-ignores-coin', 'validation/prefetch/simulator.py', '                if u[t, l, k] < p:',
             '                if u[t, l, k] < 0.0:',
             ('tests/test_prefetch.py::test_locality_zero_is_identity_and_one_repeats_the_first_token_of_each_sequence',),
             '--locality changes nothing'),
    # --- the policies beyond LRU, budgets, prefill, batch and locality (tests/test_policies.py)
    Mutation('cpu-after-gpu', 'validation/prefetch/simulator.py', 'end = max(end, r + act + cpu_ms + act)',
             'end = end + act + cpu_ms + act',
             ('tests/test_policies.py::test_cpu_compute_overlaps_the_gpu_hits_and_the_layer_waits_for_both',),
             "the host computes a layer's misses after the GPU's hits instead of beside them"),
    Mutation('cpu-ignores-batch-tokens', 'validation/prefetch/simulator.py',
             'cpu_ms += prm[P_CPU1] + (tokens_of[e] - 1) * prm[P_CPUTOK]', 'cpu_ms += prm[P_CPU1]',
             ('tests/test_policies.py::test_cpu_work_grows_with_the_tokens_routed_to_the_missed_expert',),
             "a missed expert costs the host the same for a batch's tokens as for one"),
    Mutation('lfru-no-aging', 'validation/prefetch/simulator.py',
             '        return lfru[l, e] * decay ** (t - last_step[l, e])', '        return lfru[l, e]',
             ('tests/test_policies.py::test_lfru_weighs_uses_by_their_age',),
             "LFRU ranks by a count that does not fade with the time since the last use"),
    Mutation('least-stale-ignores-gap', 'validation/prefetch/simulator.py',
             '        return -(t - last_step[l, e]) / gap[l, e]', '        return -(t - last_step[l, e])',
             ('tests/test_policies.py::test_least_stale_evicts_the_expert_most_overdue_for_its_reuse',),
             "least-stale forgets each expert's own reuse gap (it becomes LRU)"),
    Mutation('window-counts-never-reset', 'validation/prefetch/simulator.py', '            win_count[l, e] = 0\n', '',
             ('tests/test_policies.py::test_static_frequency_recomputes_its_resident_set_every_window_and_copies_the_change',),
             "static-frequency places by counts since the start instead of the last window's"),
    Mutation('lowbit-bytes-as-full', 'validation/prefetch/simulator.py',
             'full = tot[DEMAND] - tot[LOWBIT_FETCH] + tot[SPEC]', 'full = tot[DEMAND] + tot[SPEC]',
             ('tests/test_policies.py::test_lowbit_copy_first_full_copy_once_hot',),
             "low-bit copies are counted at full size"),
    Mutation('budget-split-total-not-marginal', 'validation/prefetch/budget.py',
             'rate = (hits[l, caps[l] + j] - hits[l, caps[l]]) / (j * expert_bytes)',
             'rate = hits[l, caps[l] + j] / (j * expert_bytes)',
             ('tests/test_policies.py::test_budget_splits',),
             "the optimised split ranks layers by their hits with the next slots, not by what those slots add"),
    Mutation('budget-forgets-kv', 'validation/prefetch/budget.py',
             'per_layer = (total - kv) / (shape.moe_layers * expert_bytes)',
             'per_layer = total / (shape.moe_layers * expert_bytes)',
             ('tests/test_policies.py::test_gpu_budget_pays_the_kv_cache_first',),
             "the GPU budget holds expert slots only, not the KV cache"),
    Mutation('prefill-single-buffer-free', 'validation/prefetch/simulator.py',
             'free_at = end[l - 2] if l >= 2 else start', 'free_at = start',
             ('tests/test_policies.py::test_prefill_streams_each_layer_through_two_buffers',),
             "a prefill streams every layer's experts at once, as if it had a buffer per layer"),
    Mutation('batch-union-double-counts', 'validation/prefetch/simulator.py', 'if seen[l, e] == stamp:', 'if False:',
             ('tests/test_policies.py::test_batch_lanes_need_the_union_of_their_experts',),
             "an expert two lanes need is fetched and computed twice"),
    Mutation('nf4-blob-misordered', 'validation/prefetch/cost_model.py',
             'absmax2 = absmax + 4 * math.ceil(blocks / NF4_BLOCK2)',
             'absmax2 = absmax + 4 * math.ceil(blocks / NF4_BLOCK2) + 4',
             (E + 'test_nf4_blob_is_the_cost_models_bytes_and_dequantizes_as_bitsandbytes',
              'tests/test_cost_model.py::test_nf4_and_int2_bytes_of_qwen15_expert'),
             "an NF4 expert's packed layout is misread"),
    # --- no user file lost, one writer, verified inputs, one-line errors (the trust defects of 2026-11-28)
    Mutation('swap-manifest-first', 'collection/traces/output.py',
             '        for name in new_names:              # 3. the new files, then the manifest that makes them a set\n            if os.path.lexists(staging / name):\n                os.replace(set_file(staging, name), set_file(out, name))\n        fsync_dir(out)\n        os.replace(staging / MANIFEST, old_path)\n',
             '        os.replace(staging / MANIFEST, old_path)\n        for name in new_names:\n            if os.path.lexists(staging / name):\n                os.replace(set_file(staging, name), set_file(out, name))\n        fsync_dir(out)\n',
             ('tests/test_safety.py::test_a_swap_cut_short_anywhere_is_finished_by_the_next_run',),
             'the swap moves the new manifest in before the new files: a cut leaves a set listing files not there yet', traces=True),
    Mutation('overwrite-in-place', 'collection/collector.py',
             '        return state.staging_dir, None          # --overwrite',
             '        return out, None          # --overwrite',
             ('tests/test_safety.py::test_overwrite_replaces_only_the_files_of_the_old_set',),
             '--overwrite writes the new set over the old one in place: a failure leaves neither', traces=True),
    Mutation('partials-by-glob', 'collection/traces/output.py',
             '    for name in expected_partials(names):\n        _regular_or_absent(set_file(dest, name), "temporary file this run writes")\n        set_file(dest, name).unlink(missing_ok=True)\n',
             "    for p in dest.glob('*.partial'):\n        p.unlink()\n",
             ('tests/test_safety.py::test_resume_without_a_manifest_removes_only_its_own_partials',),
             "--resume deletes every *.partial in the directory, the user's included", traces=True),
    Mutation('no-collision-check', 'collection/traces/output.py',
             '    for name in names:\n        path = set_file(directory, name)\n        if name not in owned',
             '    for name in []:\n        path = set_file(directory, name)\n        if name not in owned',
             ('tests/test_safety.py::test_a_users_file_with_a_trace_name_is_never_written_over',),
             "a user's file named like a shard is written over", traces=True),
    Mutation('no-lock', 'collection/traces/output.py',
             '            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)',
             '            pass',
             ('tests/test_safety.py::test_a_second_collector_stops_with_one_line', 'tests/test_safety.py::test_the_importer_takes_the_same_lock'),
             'two collectors write one directory at once', traces=True),
    Mutation('readers-accept-incomplete', 'collection/traces/format.py',
             '        if not self.manifest.complete and not allow_incomplete:',
             '        if False:',
             ('tests/test_safety.py::test_readers_refuse_an_incomplete_set_unless_allowed',),
             'readers accept a set whose collection never finished', traces=True),
    Mutation('router-weights-unverified', 'collection/traces/format.py',
             '                fd = open_listed_file(set_file(self.dir, info.file), info.bytes, info.sha256, self.verify,\n                                      "router weights")',
             '                pass',
             ('tests/test_safety.py::test_router_weights_are_listed_verified_and_world_readable',),
             'corrupted router weights are read without their checksum', traces=True),
    Mutation('router-weights-not-listed', 'collection/collector.py',
             '    manifest.router_weights = info\n',
             '',
             ('tests/test_safety.py::test_router_weights_are_listed_verified_and_world_readable',),
             "the router weights are not in the manifest's checksums", traces=True),
    Mutation('enospc-not-named', 'collection/traces/format.py',
             '                if e.errno in DISK_FULL:\n                    raise disk_full(self.path, e) from None\n                raise\n',
             '                raise\n',
             ('tests/test_safety.py::test_a_full_disk_during_collection_is_one_line_and_leaves_no_partial',),
             'a full disk during collection is a traceback', traces=True),
    Mutation('partial-left-on-error', 'collection/collector.py',
             '        for w in ahead.opened:\n            w.abort()',
             '        for w in ahead.opened[:0]:\n            w.abort()',
             ('tests/test_safety.py::test_a_full_disk_during_collection_is_one_line_and_leaves_no_partial',),
             'a failed collection leaves its .partial shards', traces=True),
    Mutation('buffers-batch-x-maxlen', 'collection/collector.py',
             '    max_rows = largest_batch_tokens(lengths, args.shard_size, args.batch_size)',
             '    max_rows = args.batch_size * args.max_length',
             ('tests/test_safety.py::test_capture_buffers_are_sized_by_the_largest_real_batch',),
             'capture buffers sized batch x max_length (26 GB for --batch_size 100000)', traces=True),
    Mutation('no-divergence-check', 'training/trainer.py',
             '        if not (math.isfinite(train_loss) and weights_finite):',
             '        if False:',
             ('tests/test_safety.py::test_training_stops_when_it_diverges',),
             'NaN training runs on until bincount crashes', traces=True),
    Mutation('guard-best-only', 'training/trainer.py',
             '    present = [name for name in OUTPUT_FILES if os.path.lexists(out / name)]',
             '    present = [name for name in OUTPUT_FILES[:1] if os.path.lexists(out / name)]',
             ('tests/test_safety.py::test_training_guards_every_file_it_writes_and_overwrites_only_those',),
             'training overwrites every output file but best_checkpoint.pth without --overwrite', traces=True),
    Mutation('torch-advice-passed-on', 'models/checkpoint.py',
             '    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):',
             '    if False:',
             ('tests/test_safety.py::test_a_pickled_object_checkpoint_never_suggests_weights_only_false',),
             "a checkpoint error passes on torch's advice to set weights_only=False", traces=True),
    Mutation('ks-dropped-silently', 'validation/coverage/report.py',
             '    if max(ks) > num_experts:\n        raise',
             '    if False:\n        raise',
             ('tests/test_safety.py::test_ks_larger_than_the_expert_count_is_an_error',),
             '--ks larger than E are dropped silently', traces=True),
    Mutation('prepare-before-validation', 'collection/collector.py',
             '            lock.acquire()  # a second collector stops here, before loading anything\n        return state\n',
             '            lock.acquire()  # a second collector stops here, before loading anything\n'
             '            [(out / n).unlink() for n in (state.manifest.files() if state.manifest and args.overwrite else [])]\n'
             '        return state\n',
             ('tests/test_safety.py::test_overwrite_or_resume_with_a_bad_input_deletes_nothing',),
             '--overwrite deletes the old set\'s files before the inputs are checked', traces=True),
    Mutation('never-swaps-in', 'collection/collector.py',
             '    if dest != out and ranks.is_main:\n        swap_in(out)',
             '    if False:\n        swap_in(out)',
             ('tests/test_safety.py::test_overwrite_replaces_only_the_files_of_the_old_set',),
             '--overwrite never swaps the new set in', traces=True),
    Mutation('partial-manifest-temp-left', 'collection/distributed.py',
             'name = re.compile(r"manifest\\.rank\\d{5}\\.json(" + re.escape(PARTIAL_SUFFIX) + ")?")',
             'name = re.compile(r"manifest\\.rank\\d{5}\\.json")',
             ('tests/test_distributed.py::test_partial_manifest_files_are_exactly_the_tools_names',),
             "a rank's manifest cut short mid-write is left behind by the resume"),
    Mutation('staging-codec-not-ours', 'collection/traces/output.py',
             '|{re.escape(ROUTER_WEIGHTS)}|{re.escape(CODEC_FILE)})"', '|{re.escape(ROUTER_WEIGHTS)})"',
             ('tests/test_safety.py::test_an_unfinished_staged_set_with_a_fitted_codec_is_discarded',),
             "a replacement cut short in a fitted format cannot be discarded (its codec file looks like the user's)"),
    Mutation('open-ahead-aborts-one', 'collection/collector.py', '        for w in ahead.opened:',
             '        for w in ahead.opened[:1]:',
             ('tests/test_safety.py::test_a_full_disk_during_collection_is_one_line_and_leaves_no_partial',),
             "an error during collection leaves the shard opened ahead as a .partial"),
    Mutation('writer-skips-slices', 'collection/capture.py', 'for name, t, index in slices[k::jobs]:',
             'for name, t, index in slices[k::jobs + 1]:',
             ('tests/test_capture.py::test_stored_shards_match_a_fresh_forward',),
             "the shard writer's threads leave some (tensor, layer) slices of each batch unwritten (zeros)"),
    Mutation('grouped-decode-counts-not-ends', 'collection/traces/hidden_format.py',
             'offs=counts.cumsum(0).to(torch.int32))', 'offs=counts.to(torch.int32))',
             ('tests/test_hidden_format.py::test_rows_of_mixed_layers_each_times_their_layers_matrix',),
             "the grouped GEMM of a mixed-layer decode is given each layer's row count where it needs its group's end"),
    Mutation('router-codec-decodes-with-transpose', 'collection/traces/hidden_format.py',
             'cache[dtype] = (self.basis_as(dtype).transpose(1, 2) if self.inverse is None else',
             'cache[dtype] = (self.basis_as(dtype).transpose(1, 2) if True else',
             ('tests/test_hidden_format.py::test_router_weighting_trades_plain_error_for_what_the_routers_see',
              'tests/test_hidden_format.py::test_a_router_weighted_set_is_fitted_with_its_routers_and_decodes_through_its_inverse'),
             "pca-router rows are decoded with the transposed (scaled, not orthonormal) axes instead of their inverse"),
    Mutation('router-codec-inverse-optional', 'collection/traces/format.py', '    if fmt.router_weight:  # scaled axes',
             '    if False:  # scaled axes',
             ('tests/test_hidden_format.py::test_a_router_weighted_set_is_fitted_with_its_routers_and_decodes_through_its_inverse',),
             "a pca-router codec file without its decoding matrices is read (and decodes with the transposed axes)"),
    Mutation('codec-load-in-first-epoch', 'training/trainer.py', '    codec_loaded = ts.hidden_codec(device) is not None',
             '    codec_loaded = False',
             ('tests/test_hidden_format.py::test_the_codec_is_read_once_before_the_first_epoch_is_timed',),
             "a fitted format's one-time codec load is counted in the first epoch's reading rate"),
    Mutation('previous-token-recall-across-sequences', 'validation/coverage/metrics.py',
             '    has_prev = ~first[1:].to(ids.device)', '    has_prev = torch.ones_like(first[1:]).to(ids.device)',
             ('tests/test_metrics.py::test_previous_token_recall_hand_computed',
              'tests/test_routing_report.py::test_previous_token_recall_by_hand',
              'tests/test_policies.py::test_locality_summary_by_hand'),
             "previous-token recall pairs the first token of a sequence with the last token of the one before"),
    Mutation('previous-token-recall-two-back', 'validation/coverage/metrics.py',
             '    same = (ids[1:, :, :, None] == ids[:-1, :, None, :]).sum((2, 3))',
             '    same = (ids[1:, :, :, None] == ids[:-1, :, None, :].roll(1, 0)).sum((2, 3))',
             ('tests/test_metrics.py::test_previous_token_recall_hand_computed',
              'tests/test_routing_report.py::test_previous_token_recall_by_hand'),
             "previous-token recall compares token t with token t-2"),
    Mutation('previous-token-recall-chunk-seam', 'validation/coverage/metrics.py',
             '        got, n = _shared_with_previous(ids[s - 1:e], first[s - 1:e])',
             '        got, n = _shared_with_previous(ids[s:e], first[s:e])',
             ('tests/test_metrics.py::test_previous_token_recall_reads_long_streams_in_chunks_without_a_seam',),
             "previous-token recall over a long stream loses the pair at each chunk's seam"),
    Mutation('proxy-report-one-sequence', 'tools/train_proxy_moe.py',
             '    first[np.cumsum([0] + [len(e) for e in enc[:-1]])] = True',
             '    first[0] = True',
             ('tests/test_retrain.py::test_report_previous_token_recall_is_counted_within_each_sequence',),
             "the embedded model's report counts its held-out texts as one long sequence"),
    Mutation('verdict-recall-no-ceiling', 'tools/train_proxy_moe.py',
             'TARGET_RECALL[0] <= recall <= TARGET_RECALL[1]', 'TARGET_RECALL[0] <= recall',
             ('tests/test_retrain.py::test_verdict_is_the_target_at_its_edges',),
             "a retrained model with more locality than real models (recall above 0.45) passes the routing target"),
    Mutation('choose-the-farthest', 'tools/retrain_bundle.py', '    return min(missed)[1], False',
             '    return max(missed)[1], False',
             ('tests/test_retrain.py::test_choose_takes_the_first_that_meets_the_target_else_the_closest',),
             "with no variant meeting the target, the one missing the most checks is brought back"),
    Mutation('unpack-trusts-pieces', 'tools/retrain_bundle.py', '        if sha256(data) != p["sha256"]:',
             '        if False:',
             ('tests/test_retrain.py::test_unpack_refuses_a_corrupted_or_missing_piece_and_leaves_dest_alone',),
             "a piece corrupted in transfer is only noticed, if at all, inside the tar"),
    Mutation('locality-loss-across-windows', 'tools/train_proxy_moe.py',
             '.view(batch, -1, logits.shape[-1])   # (B, T, E)', '.view(1, -1, logits.shape[-1])   # (B, T, E)',
             ('tests/test_retrain.py::test_locality_loss_pulls_toward_the_previous_tokens_experts_within_each_window',),
             "the locality loss pulls the first token of a window toward the last token of another window"),
    Mutation('locality-weight-backwards', 'tools/train_proxy_moe.py',
             'error = ((args.locality_target - loc_recall.mean())', 'error = ((loc_recall.mean() - args.locality_target)',
             ('tests/test_retrain.py::test_locality_weight_follows_its_target',),
             "the locality weight grows when the recall is already above its target"),
    Mutation('comma-choices-unchecked', 'common/errors.py', '        if x not in allowed:', '        if False:',
             ('tests/test_errors.py::test_comma_lists_of_choices_name_the_first_unknown_item',),
             "an unknown item of a comma list of choices (--predictors, --kinds, ...) is taken without a word"),
    Mutation('leave-without-waiting', 'common/ranks.py', '            dist.barrier()\n            dist.destroy',
             '            dist.destroy',
             ('tests/test_distributed_collect.py::test_ranks_leave_together_and_tear_the_group_down',),
             "a rank done early tears the process group down while a peer may still be talking to it"),
    Mutation('leave-keeps-the-group', 'common/ranks.py', '            dist.destroy_process_group()\n\n',
             '            pass\n\n',
             ('tests/test_distributed_collect.py::test_ranks_leave_together_and_tear_the_group_down',),
             "the process group is left for the interpreter's exit to tear down (once aborted a finished rank)"),
    # --- routing imported from serving engines, and the routing report
    Mutation("import-eplb-map-ignored", "collection/importers.py",
             "moe = emap[self.moe_slots[None, :, None], moe]", "moe = moe + 0 * emap[0, 0]",
             (IR + "test_sglang_recorder_maps_physical_ids_to_logical",
              IR + "test_physical_ids_without_a_map_are_refused_and_a_given_map_applies"),
             "physical expert ids recorded under expert-parallel load balancing are kept as if they were logical"),
    Mutation("import-recorder-request-boundary-dropped", "collection/importers.py",
             "starts = np.flatnonzero(~follows)", "starts = np.array([0])",
             (IR + "test_sglang_recorder_maps_physical_ids_to_logical",),
             "every request of a recorder dump becomes one sequence (a position restarting at 0 is not a boundary)"),
    Mutation("import-vllm-prompt-rows-dropped", "collection/importers.py",
             "ids = np.concatenate(parts) if len(parts) > 1 else parts[0]", "ids = parts[-1]",
             (IR + "test_vllm_round_trip_keeps_every_id_and_request_order",),
             "a vLLM request's prompt rows are dropped, its generation rows kept"),
    Mutation("import-token-ids-misaligned", "collection/importers.py", "return tokens[:T].astype(np.int32)",
             "return tokens[-T:].astype(np.int32)",
             (IR + "test_vllm_round_trip_keeps_every_id_and_request_order", IR + "test_sglang_meta_round_trip"),
             "token ids drop the first token instead of the sampled last one: every id is the next position's"),
    Mutation("import-dense-slot-kept", "collection/importers.py",
             "dense = (rec.ids == rec.fill).all(axis=(0, 2))", "dense = np.zeros(S, dtype=bool)",
             (IR + "test_vllm_npy_and_dense_first_layer",),
             "a dense layer's zeros (DeepSeek's first layer in vLLM's layout) are imported as routing"),
    Mutation("import-llamacpp-prefill-tokens-misread", "collection/importers.py",
             "np.where(li == last, 0, skip[ub])", "np.where(li == last, 0, 0)",
             (IR + "test_llamacpp_csv_keeps_tokens_routed_at_every_layer",),
             "a prefill ubatch's rows at the layers before the last are read from its first tokens, not the tokens "
             "the last layer routed"),
    Mutation("manifest-imported-may-claim-hidden-states", "collection/traces/format.py",
             'if hl or capture.get("store_logits", True) or d.get("router_weights") is not None:', "if False:",
             (IR + "test_imported_set_loads_without_hidden_states_and_readers_refuse_what_it_lacks",),
             "a manifest of imported routing may claim hidden states, logits or router matrices it cannot have"),
    Mutation("token-ids-never-required", "collection/traces/format.py", "    if not manifest.has_token_ids:\n",
             "    if False:\n",
             (IR + "test_imported_set_loads_without_hidden_states_and_readers_refuse_what_it_lacks",),
             "a set without token ids is read as if its -1 placeholders were tokens"),
    Mutation("report-history-previous-is-the-token", "validation/routing_report.py",
             "p = ids[t - 1, j, i]", "p = ids[t, j, i]",
             (RR + "test_history_predictors_by_hand", RR + "test_kernel_ranks_are_the_metric_ranks"),
             "the previous-token predictor is given token t's own experts, the answer"),
    Mutation("report-reuse-from-first-use", "validation/routing_report.py", "                last[l, e] = t\n",
             "                last[l, e] = t if last[l, e] < 0 else last[l, e]\n",
             (RR + "test_reuse_distances_by_hand",),
             "reuse distances count from an expert's first use, not its last"),
    Mutation("report-working-set-window-lost", "validation/routing_report.py",
             "    n = T // w\n    seen", "    n = T // w - 1\n    seen", (RR + "test_working_sets_by_hand",),
             "the last whole window of the stream is left out of the working set"),
    Mutation("report-popularity-fitted-on-measured-half", "validation/routing_report.py",
             "counts_fit = expert_counts(r.ids[:r.cut], E)", "counts_fit = expert_counts(r.ids, E)",
             (RR + "test_history_predictors_by_hand",),
             "popularity (and the static hot set) is fitted on the tokens it is measured on"),
    Mutation("report-prefetch-reads-the-token-itself", "validation/routing_report.py",
             "pred = r.ids[r.cut - 1:T - 1].copy()", "pred = r.ids[r.cut:T].copy()",
             (RR + "test_cache_hit_rates_by_hand",),
             "the previous-token prefetcher is handed token t's own experts (an oracle that claims to be history)"),
    # --- a lookahead in tokens (the window target of learned eviction)
    Mutation('window-includes-token-t', 'collection/traces/rows.py',
             '        rows = torch.where(rows >= 0, nxt[rows.clamp(min=0)], rows)\n        out.append(rows)',
             '        out.append(rows)\n        rows = torch.where(rows >= 0, nxt[rows.clamp(min=0)], rows)',
             (W + "test_the_window_is_the_next_tokens_of_the_same_sequence",),
             "the window is tokens t..t+W-1: token t's own experts, known when it is asked, count as 'used soon'"),
    Mutation('window-crosses-sequences', 'collection/traces/rows.py',
             '    has_prev = torch.nonzero(block.prev >= 0).squeeze(1)\n'
             '    return nxt.index_put_((block.prev[has_prev],), has_prev)',
             '    has_prev = torch.arange(1, block.prev.shape[0], device=block.prev.device)\n'
             '    return nxt.index_put_((has_prev - 1,), has_prev)',
             (W + "test_the_window_is_the_next_tokens_of_the_same_sequence",
              W + "test_recency_on_the_window_target_by_hand"),
             "the next row of the block is taken as the next token: a window runs on into the next sequence"),
    Mutation('window-ap-divides-by-e', 'validation/coverage/metrics.py',
             'return torch.where(used, used_at_least / at_least, 0.0).sum(1) / used.sum(1).double()',
             'return torch.where(used, used_at_least / at_least, 0.0).sum(1) / used.shape[1]',
             (W + "test_window_metrics_by_hand", W + "test_random_average_precision_is_the_mean_over_every_order"),
             "average precision divided by the number of experts instead of the size of the set"),
    Mutation('window-recall-divides-by-k', 'validation/coverage/metrics.py',
             '    return found / used.sum(1).double()', '    return found / k', (W + "test_window_metrics_by_hand",),
             "window recall@k divided by k (a precision) instead of the size of the set"),
    Mutation('window-auc-ties-win', 'validation/coverage/metrics.py', '(below + at_most + 1).double() / 2',
             'at_most.double()', (W + "test_window_metrics_by_hand",),
             "AUC counts a tie as a win for the used expert: constant scores would read 1, not 0.5"),
    Mutation('window-scorer-sees-own-layer', 'validation/coverage/scorers.py',
             '        f = make_features(block, tok, layer, lookahead, num_experts, spec, dtype)',
             '        f = make_features(block, tok, layer, int(window) or lookahead, num_experts, spec, dtype)',
             (W + "test_no_future_information_reaches_a_window_prediction",),
             "a window row reads token t's routing at layer l, which does not exist before layer l's router runs"),
    Mutation('window-scorer-gives-logits', 'validation/coverage/scorers.py',
             '        return torch.sigmoid(logits) if window else logits', '        return logits',
             (W + "test_a_window_checkpoint_round_trips_and_scores_probabilities",),
             "a token-lookahead scorer hands its logits to the simulator instead of probabilities of use"),
    Mutation('window-loss-counts-rows-without-target', 'training/trainer.py',
             '    return (per_row * rows).sum() / rows.sum().clamp(min=1)', '    return per_row.mean()',
             (W + "test_the_window_loss_counts_only_rows_with_a_target",),
             "a sequence's last token, which has no window, is trained toward 'no expert used soon'"),
    Mutation('window-not-saved', 'training/trainer.py', 'dropout=args.dropout, lookahead_tokens=W)',
             'dropout=args.dropout)', (W + "test_training_for_a_window_learns_and_saves_it",),
             "the checkpoint forgets it was trained for a window: it is then evaluated and used as a same-layer "
             "predictor", traces=True),
    Mutation('recency-oldest-first', 'validation/coverage/scorers.py', 'float(history + 1 - j)', 'float(j)',
             (W + "test_recency_scores_the_last_use_most_recent_first_and_frequency_counts",
              W + "test_recency_on_the_window_target_by_hand"),
             "recency ranks the oldest use first"),
    Mutation('frequency-counts-presence', 'validation/coverage/scorers.py',
             '        count += expert_set(block, layer, rows, num_experts)',
             '        count = torch.maximum(count, expert_set(block, layer, rows, num_experts).float())',
             (W + "test_recency_scores_the_last_use_most_recent_first_and_frequency_counts",),
             "frequency marks whether an expert was used, not how often"),
    # --- the offload engine (offload/): a wrong slot, a stale slot, a prefetch into the current layer, a missed wait
    Mutation("engine-demand-wrong-slot", "offload/engine.py",
             "self._issue(l, [(e, base + s) for e, s in cache.demand[:n_dem].tolist()], self.markers[l])",
             "self._issue(l, [(e, base + (s + 1) % self.C) for e, s in cache.demand[:n_dem].tolist()], "
             "self.markers[l])",
             (E + "test_every_policy_generates_the_resident_models_tokens[on-demand-C15]",
              E + "test_every_policy_generates_the_resident_models_tokens[on-demand-C3]"),
             "a demand copy lands in the slot next to the one the tables give it"),
    Mutation("engine-stale-slot-after-eviction", "offload/cache.py", "                        slot_of[l, old] = -1\n",
             "", (E + "test_every_policy_generates_the_resident_models_tokens[on-demand-C3]",
                  E + "test_counts_equal_the_simulators_for_forced_routing[on-demand]"),
             "an evicted expert stays in the slot table: a later access reads the slot's new expert", traces=True),
    Mutation("engine-prefetch-into-current-layer", "offload/cache.py", "tl = l + d", "tl = l",
             (E + "test_every_policy_generates_the_resident_models_tokens[prefetch:router-reuse-C4]",
              E + "test_counts_equal_the_simulators_for_forced_routing[prefetch:router-reuse]"),
             "a prefetch takes slots of the layer being computed, evicting experts its access needs", traces=True),
    Mutation("engine-missed-prefetch-wait", "offload/engine.py",
             "self.copies.wait(int(self.row_seq[base + need].max()))  # the newest copy into any row it reads",
             "self.copies.wait(demand_seq)",
             (E + "test_copies_that_run_only_when_waited_for_change_nothing[oracle-True]",
              E + "test_copies_that_run_only_when_waited_for_change_nothing[prefetch:router-reuse-False]"),
             "the compute waits for this step's demand copies only, not for the prefetches its hits read",
             traces=True),
    Mutation("engine-one-staging-bank", "offload/engine.py", "slots.staging_row((g % 2) * G + i)",
             "slots.staging_row(i)",
             (E + "test_a_long_prompt_streams_through_both_staging_banks",
              E + "test_every_policy_generates_the_resident_models_tokens[on-demand-C0]"),
             "both staging groups queued up front land in one bank: the second overwrites the first before use"),
    Mutation("engine-nf4-offset-dropped", "offload/slots.py",
             "absmax = absmax * absmax2.repeat_interleave(256, dim=1)[:, :nb] + offset",
             "absmax = absmax * absmax2.repeat_interleave(256, dim=1)[:, :nb]",
             (E + "test_nf4_blob_is_the_cost_models_bytes_and_dequantizes_as_bitsandbytes",
              E + "test_nf4_engine_equals_the_per_expert_nf4_resident_model"),
             "the batched NF4 dequantization forgets the double quantization's offset"),
    Mutation("engine-batch-first-row-only", "offload/engine.py",
             "access = flat if self.N == 1 else _first_appearance(flat)", "access = flat[:self.K]",
             (E + "test_a_batch_of_two_with_padding_uses_the_union_of_its_experts",),
             "a batch's step loads the first row's experts only"),
    Mutation("engine-live-previous-token-wrong-layer", "offload/prefetch.py",
             "f.prev_token = self.hist_routing[target, :, o] * valid(0)",
             "f.prev_token = self.hist_routing[l, :, o] * valid(0)",
             (E + "test_live_predictions_equal_the_predictor_on_the_same_rows[hybrid]",),
             "the live previous-token feature reads the input layer, not the target layer", traces=True),
    # --- the newcomer's path: --help, what to add, what is kept, what a result is worth, the demo's last lines
    Mutation('shell-help-runs-on', 'tools/gpu/args.bash', '-h|--help) usage; exit 0 ;;', '-h|--help) usage ;;',
             ('tests/test_help.py::test_shell_help_prints_usage_and_does_nothing_else',),
             "a GPU run script's --help goes on to do its work (a 2.36 GiB collection once started this way)"),
    Mutation('shell-option-as-output', 'tools/gpu/args.bash', '    case "$a" in -*) echo', '    case "$a" in --=*) echo',
             ('tests/test_help.py::test_shell_refuses_an_option_as_output_and_wrong_arity',),
             "a mistyped option is taken for the output directory and created under that name"),
    Mutation('trainer-ignores-missing-logits', 'training/checks.py',
             '    if args.loss_kl > 0 and not m.capture.get("store_logits", False):', '    if False:',
             (G + 'test_the_anchored_trainer_on_demo_traces_says_what_to_add_and_writes_nothing',
              G + 'test_each_missing_input_is_named_with_its_collection_flag_and_the_training_flags_that_do_without'),
             "the anchored trainer meets traces without router logits only once training begins, with no word of the fix"),
    Mutation('compare-trains-before-checking', 'scripts/compare_predictors.py',
             '    check_jobs(args, jobs, kinds, ts)  #', '    #',
             (G + 'test_compare_predictors_checks_every_predictor_before_training_any',),
             "compare_predictors trains every other predictor before it finds the traces cannot serve one"),
    Mutation('near-random-unwarned', 'training/checks.py', '    if recall < chance + NEAR_RANDOM:',
             '    if recall < chance:',
             (G + 'test_a_result_near_random_or_below_router_reuse_is_warned',
              G + 'test_a_trainer_that_learned_nothing_says_so'),
             "a predictor that learned next to nothing (recall@4 0.09 against random 0.067) is reported without a word",
             traces=True),
    Mutation('below-router-reuse-unwarned', 'training/checks.py', '    if reuse is not None and recall < reuse:',
             '    if reuse is not None and recall < reuse - 0.05:',
             (G + 'test_a_result_near_random_or_below_router_reuse_is_warned',),
             "a predictor worse than the training-free router reuse is reported without a word"),
    Mutation('reference-reuses-own-router', 'validation/coverage/evaluate.py',
             'baseline_scorer("router-reuse", ts, lookahead,', 'baseline_scorer("router-reuse", ts, 0,',
             (G + 'test_router_reuse_recall_is_the_baselines',),
             "the trainer's router-reuse reference scores layer l's own router, not layer l+d's", traces=True),
    Mutation('interrupt-forgets-latest', 'training/trainer.py',
             '        progress["latest"] = epoch  #', '        #',
             (G + 'test_ctrl_c_in_training_names_what_was_kept',),
             "Ctrl-C in training says nothing was kept while latest_checkpoint.pth holds the last epoch", traces=True),
    Mutation('resume-keeps-overwrite', 'scripts/collect_traces.py',
             '    flags = [a for a in argv if not given(a, "--overwrite")]', '    flags = list(argv)',
             (G + 'test_ctrl_c_in_collection_names_the_resume_command',),
             "the resume command printed after Ctrl-C keeps --overwrite, which argparse refuses beside --resume"),
    Mutation('model-type-not-from-checkpoint', 'scripts/validate_coverage_analysis.py',
             '        args.model_type = cfg.kind\n', '\n',
             ('tests/test_pipeline.py::test_the_checkpoint_says_its_kind_and_a_contradicting_model_type_is_refused',),
             "a checkpoint's coverage analysis needs --model-type although the checkpoint knows its kind",
             traces=True),
    Mutation('demo-prefetch-lines-swapped', 'tools/demo_summary.py',
             "{mine['speedup_vs_on_demand']:.2f}x the tokens/s", "{reuse['speedup_vs_on_demand']:.2f}x the tokens/s",
             ('tests/test_demo.py::test_the_demo_ends_with_one_simulated_line_per_cache_size_and_the_traces_locality',),
             "the demo credits the learned predictor with router reuse's simulated speedup"),
    Mutation('docs-flag-misspelt', 'README.md', '--lookahead 1 --cache-experts 8,15,30 \\\n    --policies on-demand',
             '--lookahead 1 --cache-expert 8,15,30 \\\n    --policies on-demand',
             ('tests/test_docs_commands.py::test_documented_command_dry_runs',),
             "a documented command spells a flag otherwise than its script's --help (argparse may even take the prefix)"),
    Mutation('quick-example-near-random', 'scripts/train_hybrid_predictor.py',
             '--traces routing_data/traces/quick --epochs 2 --lr 3e-3 --dropout 0', '--traces routing_data/traces/quick '
             '--epochs 2 --dropout 0', ('tests/test_docs_commands.py::test_the_seconds_long_cpu_commands_run_as_written_and_learn',),
             "a documented CPU example trains at the seed's learning rate and silently ends near random"),
    # --- trust, second pass: the attacks of tests/test_attacks.py
    Mutation("codec-name-unchecked", "collection/traces/format.py",
             '    ("capture", "hidden_codec", "file"): re.compile(re.escape(CODEC_FILE)),\n', "",
             (A + "test_the_critical_reproduction", A + "test_every_file_a_written_manifest_names_is_a_checked_field"),
             "capture.hidden_codec.file is checked only for fitted formats: a manifest makes --overwrite delete any "
             "file", traces=True),
    Mutation("links-followed", "common/paths.py", "        return stat.S_ISLNK(os.lstat(path).st_mode)",
             "        return False",
             (A + "test_a_staging_folder_that_is_a_link_is_refused",),
             "a staging folder that is a link is followed: another folder's shard is deleted", traces=True),
    Mutation("old-set-links-found-late", "collection/traces/output.py",
             "        for name in manifest.owned_files():  # refused now",
             "        for name in []:  # refused now",
             (A + "test_a_file_of_the_set_that_is_a_link_is_refused_by_readers_and_writers",),
             "a link among the old set's files is found only when the swap begins, after the whole collection",
             traces=True),
    Mutation("swap-ignores-readers", "collection/traces/output.py",
             "            held = locked_manifest(old_path, exclusive=True, waiting=SWAP_WAITING)",
             "            held = -1",
             (A + "test_a_set_being_read_is_never_swapped_underneath_its_reader",),
             "--overwrite swaps a set while a training run reads it", traces=True),
    Mutation("reader-takes-no-lock", "collection/traces/format.py", "        d, self._lock = manifest_json(self.dir, lock=True)",
             "        d, self._lock = manifest_json(self.dir, lock=False)",
             (A + "test_a_set_being_read_is_never_swapped_underneath_its_reader",
              A + "test_a_reader_waits_for_a_swap_and_then_reads_the_new_set"),
             "readers take no lock: a swap replaces the set they read", traces=True),
    Mutation("reader-reopens-shard-by-name", "collection/traces/rows.py", "    raw = reader_for(device).read(sh.fd,",
             "    raw = reader_for(device).read(sh.path,",
             (A + "test_shards_are_read_through_the_descriptor_that_was_verified",),
             "a verified shard is read again through its name, which may point at other bytes by then", traces=True),
    Mutation("checkpoint-built-before-checked", "models/checkpoint.py", "    if want != got:", "    if False:",
             (A + "test_a_checkpoint_config_is_checked_against_its_weights_before_anything_is_built",),
             "a checkpoint's config sizes the predictor before the stored weights are compared (a memory bomb)",
             traces=True),
    Mutation("training-output-checked-late", "training/trainer.py",
             '    check_writable("--output", args.output, "dir")  # before training',
             '    None  # before training',
             (A + "test_an_unwritable_checkpoint_folder_is_refused_before_training",),
             "training finds an unwritable --output only when it saves, after the training", traces=True),
    Mutation("nan-hidden-accepted", "collection/traces/format.py",
             "        if self.verify and t.is_floating_point() and t.numel():", "        if False:",
             (A + "test_nan_hidden_states_with_a_valid_checksum_are_refused_naming_shard_and_layer",),
             "NaN hidden states with a valid checksum change results without a word", traces=True),
    Mutation("json-writes-nan", "common/atomic.py", "sort_keys=False, allow_nan=False)",
             "sort_keys=False, allow_nan=True)",
             (A + "test_json_is_never_written_with_nan_or_infinity",),
             "NaN and Infinity are written into JSON files, which no JSON reader accepts"),
    Mutation("simulate-cost-flags-unchecked", "validation/prefetch/driver.py",
             '        number_flag(name.replace("_", "-"), getattr(args, name), 0, MAX_MS)', "        pass",
             (A + "test_simulate_refuses_cost_flags_that_are_not_finite_numbers_in_range",),
             "NaN or infinite cost flags run the simulation and end in a traceback or NaN results", traces=True),
    Mutation("map-engine-any-row", "validation/prefetch/policy_map.py",
             "isinstance(r, dict) and ENGINE_ROW in str(r.get(\"label\"))", "isinstance(r, dict)",
             ("tests/test_policies.py::test_the_maps_engine_profile_reads_the_engines_benchmark",),
             "the map's engine profile takes the benchmark's first calibrated row (C = 0 streaming) for the engine"),
    Mutation("measure-at-the-presets-depth", "offload/costs.py",
             "    model = random_model(preset, device, dtype, seed, layers=m.num_layers)",
             "    model = random_model(preset, device, dtype, seed)",
             (E + "test_the_simulators_measured_costs_come_from_the_engine",),
             "--measure times the preset's own layer count, not one layer per MoE layer of the simulated traces"),
    Mutation("calibration-cold", "offload/costs.py",
             "    model.generate(prompt.to(e.device), max_new_tokens=WARM_TOKENS, min_new_tokens=WARM_TOKENS, do_sample=False,\n"
             "                   pad_token_id=0)\n    handle.reset()\n",
             "",
             (E + "test_costs_are_measured_warm_on_the_rows_the_timed_runs_decode",),
             "the engine's costs are measured on its first, cold decode (2.6x slower per token than the runs they "
             "predict)"),
    Mutation("calibration-after-the-warm-rows", "offload/costs.py",
             "                   pad_token_id=0)\n    handle.reset()\n    e.profile", "                   pad_token_id=0)\n    e.profile",
             (E + "test_costs_are_measured_warm_on_the_rows_the_timed_runs_decode",),
             "the measured decode continues the forced stream after the warm-up's rows, not the rows a timed run decodes"),
    Mutation("engine-runs-any-registry-policy", "offload/api.py", "        raise\n    check_engine_policy(pol)\n    return pol\n",
             "        raise\n    return pol\n",
             (E + "test_a_policy_the_engine_does_not_run_is_refused_not_run_as_lru",),
             "a policy the engine does not have (LFRU, CPU compute, eviction scores) runs as LRU under its own name"),
    Mutation("forced-predictions-by-policy-name", "offload/engine.py",
             "stream.predictions[self.policy.prefetch_key]", "stream.predictions[self.policy.name]",
             (E + "test_counts_equal_the_simulators_for_forced_routing[lfu+prefetch:router-reuse]",),
             "an eviction joined to a prefetch reads forced predictions by its whole name: a KeyError traceback"),
    Mutation("cache-gib-nan-taken", "offload/cache.py",
             "    number_flag(\"cache-gib\", cache_gib, 0, 1 << 20, above_low=True)", "    pass",
             (E + "test_bad_inputs_of_the_library_are_one_line",),
             "--cache-gib nan or inf ends in a ValueError traceback"),
    Mutation("staging-bank-unbounded", "offload/api.py",
             "    if staging_experts is not None and not 1 <= staging_experts <= E:", "    if False:",
             (E + "test_bad_inputs_of_the_library_are_one_line",),
             "--staging-experts 0 silently becomes top-k, and a huge one tries to allocate terabytes"),
    Mutation("empty-prompts-file-generates-the-default", "scripts/generate_offloaded.py",
             "        if not lines:\n", "        if False:\n",
             (E + "test_the_script_answers_bad_input_in_one_line[argv8-holds no prompt]",),
             "an empty prompts file generates from the default prompt without a word"),
    Mutation("bench-engine-peak-never-above-cap", "tools/bench_offload.py",
             "{'<=' if cap_gib and peak <= cap_gib else 'ABOVE'} the cap", "{'<='} the cap",
             ("tests/test_bench_offload.py::test_target_lines_by_hand",),
             "the engine's peak is reported within accelerate's cap whatever it is"),
    Mutation("generate-forced-stream-unchecked", "scripts/generate_offloaded.py", "        if need > have:",
             "        if need > have * 1000:",
             ("tests/test_engine.py::test_the_script_refuses_a_run_longer_than_its_forced_routing_before_generating",),
             "a run longer than its forced routing starts and fails when the stream runs out"),
    Mutation("engine-implementation-read-once", "offload/engine.py",
             '        return getattr(self.model.config, "_experts_implementation", None) or "eager"',
             '        return "grouped_mm"',
             ("tests/test_engine.py::test_an_implementation_switched_after_conversion_never_sees_the_sentinel",),
             "the engine keeps the implementation it saw at conversion after generate() switches it"),
    Mutation("bench-predictor-best-row", "tools/bench_offload.py",
             'lines.append(f"predictor: {max(graph):.1f} us', 'lines.append(f"predictor: {min(graph):.1f} us',
             ("tests/test_bench_offload.py::test_target_lines_by_hand",),
             "the predictor target reads its fastest row, not its slowest"),
    Mutation("bench-collector-on-in-timed-runs", "tools/bench_offload.py", "    gc.collect()\n    gc.disable()\n",
             "    gc.collect()\n", ("tests/test_bench_offload.py::test_a_tiny_run_writes_every_row",),
             "Python's cyclic collector can run inside a timed decode"),
    Mutation("report-written-through-a-link", "common/paths.py", '    if kind == "file" and is_link(path):',
             '    if False:', REPORT,
             "a report flag naming a symbolic link replaces the link (its target's name is kept, the link is lost)"),
    Mutation("report-replaces-a-trace-sets-file", "common/paths.py",
             '            return f"is a file of the trace set in {parent}"', "            pass",
             REPORT,
             "--json on a trace set's manifest or shard replaces it (the next run on the set fails)"),
    Mutation("report-replaces-a-checkpoint", "common/paths.py", "    if head.startswith(ZIP_MAGIC):",
             "    if False:", REPORT,
             "--json on a predictor checkpoint copied out of its run replaces it"),
    Mutation("json-report-replaces-any-file", "common/paths.py", "        if is_json and not ok:",
             "        if False:", REPORT,
             "--json on a text file (a prompts file, a README) replaces it"),
    Mutation("checkpoint-garbage-called-a-pickle", "models/checkpoint.py",
             '    if not (head.startswith(ZIP_MAGIC) or head.startswith(b"\\x80")):', "    if False:",
             ("tests/test_safety.py::test_a_file_torch_never_wrote_is_not_called_a_pickle_of_objects",),
             "a text file under a checkpoint's name is refused as a pickle of Python objects (the wrong reason)"),
    Mutation("gpu-gib-silently-replaces-cache-experts", "scripts/simulate_prefetch.py",
             "    if args.gpu_gib is not None and args.cache_experts is not None:", "    if False:",
             ("tests/test_policies.py::test_bad_input_is_one_line",),
             "--cache-experts given beside --gpu-gib is dropped without a word"),
    Mutation("unwritable-report-is-a-traceback", "common/atomic.py",
             "        if isinstance(e, OSError) and e.filename in (str(tmp), str(path)):", "        if False:",
             ("tests/test_errors.py::test_a_report_that_cannot_be_written_is_one_line",),
             "a report that cannot be written where the pre-flight could not tell (/proc) ends in a traceback"),
    Mutation("lowbit-copy-always-nf4", "scripts/simulate_prefetch.py",
             "    args.lowbit_format = args.lowbit_format or lowbit_below(args.expert_format) or args.expert_format",
             '    args.lowbit_format = args.lowbit_format or "nf4"',
             ("tests/test_policies.py::test_the_low_bit_copy_defaults_below_the_experts_format_and_int2_has_none",),
             "the low-bit copy is NF4 whatever the experts' format (an NF4 run's default list stops on it)"),
    Mutation("int2-default-list-keeps-lowbit", "validation/prefetch/cost_model.py",
             "    if lowbit_below(expert_format) is not None:\n        return policies\n",
             "    if True:\n        return policies\n",
             ("tests/test_policies.py::test_the_low_bit_copy_defaults_below_the_experts_format_and_int2_has_none",),
             "the default policy list keeps lowbit-on-miss where no narrower format exists"),
    Mutation("bench-collector-on-in-calibration", "tools/bench_offload.py",
             "            with no_collector():  # its costs predict the timed runs",
             "            with contextlib.nullcontext():  # its costs predict the timed runs",
             ("tests/test_bench_offload.py::test_a_tiny_run_writes_every_row",),
             "the calibration decode runs with the collector on, unlike the timed runs it predicts"),
    Mutation("oracle-window-counts-the-current-step", "validation/prefetch/simulator.py",
             "    return np.ascontiguousarray(run[np.arange(T) + 1] - run[later]",
             "    return np.ascontiguousarray(run[np.arange(T)] - run[later]",
             ("tests/test_policies.py::test_oracle_window_score_counts_the_next_steps_once_per_step",),
             "the window bound counts step t itself (whose experts are pinned anyway) instead of t+1..t+W"),
    Mutation("trainer-anchored-flags-silently-dropped", "training/trainer.py", "    if args.model_type == \"anchored\":\n        return []\n",
             "    return []\n", ("tests/test_routing_only.py::test_the_hidden_reading_predictors_on_imported_routing_are_refused_in_one_line_naming_the_flag",),
             "--window (or any anchored-only flag) given to the hybrid or layer-aware predictor is dropped without a word"),
    Mutation("engine-staged-weights-in-hidden-dtype", "offload/engine.py",
             "return (out * weights.reshape(-1, 1)).view(N, K, -1)",
             "return (out * weights.reshape(-1, 1).to(out.dtype)).view(N, K, -1)",
             ("tests/test_engine.py::test_a_streamed_bf16_prompt_is_the_resident_models_bit_for_bit",),
             "a streamed prompt's routing weights rounded to the hidden states' dtype before the product (fp32 routers)"),
    Mutation("costs-predictor-never-timed", "offload/costs.py",
             "    if pred is None or (pred is e.predictor and e.d >= e.L):", "    if True:", ("tests/test_bench_offload.py::test_a_tiny_run_writes_every_row",),
             "the predictor's own GPU time is never measured"),
    Mutation("engine-wide-batch-wrong-table", "offload/engine.py", "                rows = self._remap(cache.slot_of[l], ids)",
             "                rows = self._remap(np.sort(cache.slot_of[l]), ids)",
             ("tests/test_engine.py::test_a_batch_wider_than_an_upload_row_remaps_on_the_device",),
             "a batch wider than an upload row reads its experts from the wrong slots"),
    Mutation("engine-slot-ids-off-by-one", "offload/engine.py",
             "                rows = self.uploads.send(cache.slot_of[l, flat]).view(ids.shape)",
             "                rows = self.uploads.send((cache.slot_of[l, flat] + 1) % self.C).view(ids.shape)",
             ("tests/test_engine.py::test_every_policy_generates_the_resident_models_tokens",),
             "the common decode step reads each expert from the next slot"),
    Mutation("bench-zero-tokens-is-the-default", "tools/bench_offload.py",
             "    if args.tokens is not None and not 2 <= args.tokens <= MAX_TOKENS:",
             "    if args.tokens and not 2 <= args.tokens <= MAX_TOKENS:",
             ("tests/test_bench_offload.py::test_bench_flags_out_of_range_are_refused_before_any_model_is_built",),
             "--tokens 0 runs the benchmark at the default token count"),
    Mutation("engine-costs-nan-taken", "validation/prefetch/policy_map.py",
             "    if not all(math.isfinite(v) for v in phases) or min(phases) < 0", "    if min(phases) < 0",
             ("tests/test_policies.py::test_the_maps_engine_profile_reads_the_engines_benchmark",),
             "NaN engine phases run the whole map and fail only when its JSON is written"),
    Mutation("forced-cache-ignores-the-model", "offload/api.py",
             "        key = (str(routing_from), (L, E, K), pol.name,", "        key = (str(routing_from), pol.name,",
             (E + "test_forced_routing_loaded_for_one_model_is_checked_again_for_another",),
             "a forced stream cached for one model is handed unchecked to a model of another shape"),
    Mutation("lr-any-positive", "training/trainer.py", "MIN_LR = 1e-12", "MIN_LR = 5e-324",
             (A + "test_training_flags_out_of_range_are_refused_before_the_traces_are_read[--lr-1e-310]",),
             "a learning rate too small to move a float32 weight trains for the whole run and learns nothing",
             traces=True),
    Mutation("simulate-cost-floors-gone", "validation/prefetch/driver.py", "MIN_GBPS = 1e-3", "MIN_GBPS = 5e-324",
             (A + "test_simulate_refuses_cost_flags_that_are_not_finite_numbers_in_range[--link-gbps-1e-310]",),
             "a link too slow to move a byte in a finite time ends in infinite costs and an unwritable prefetch.json",
             traces=True),
    Mutation("warmup-past-the-stream", "scripts/simulate_prefetch.py",
             "    if args.warmup_tokens >= stream.tokens:", "    if False:",
             (A + "test_simulate_refuses_cost_flags_that_are_not_finite_numbers_in_range",),
             "--warmup-tokens past the stream leaves no token to count (a traceback)", traces=True),
    Mutation("wedged-folder-stays-wedged", "collection/traces/output.py",
             "    return ReplacedSet(tuple(name for name, why in entries if why is None),",
             "    return ReplacedSet(tuple(name for name, why in entries),",
             (A + "test_a_wedged_folder_is_named_by_readers_and_finished_by_the_next_run",),
             "a swap an older version stopped on a malformed name can never be finished", traces=True),
    Mutation("missing-manifest-no-resume-hint", "collection/traces/format.py",
             "    if (staging.is_dir() and not is_link(staging)", "    if (False and staging.is_dir()",
             (A + "test_a_wedged_folder_is_named_by_readers_and_finished_by_the_next_run",),
             "after a swap cut short, readers say only 'manifest.json: missing'", traces=True),
    Mutation("legacy-router-weights-owned", "collection/traces/format.py",
             '        unlisted = self.router_weights is None and not self.plan.get("legacy_import")',
             "        unlisted = self.router_weights is None",
             (A + "test_an_unlisted_router_weights_file_beside_a_legacy_import_is_the_users",),
             "import --overwrite deletes a router_weights.safetensors no manifest lists"),
    Mutation("router-rule-unchecked", "collection/traces/format.py",
             '        if (why := router_spec_problem(routing.get("router"), routing["num_experts"], routing["top_k"])):',
             "        if (why := None):",
             (A + "test_a_routing_rule_that_cannot_drive_the_router_baselines_is_refused",),
             "routing.router given as a string or with bad groups ends in a traceback", traces=True),
    Mutation("manifest-sizes-unbounded", "collection/traces/format.py",
             "            if routing[key] > most:", "            if False:",
             (A + "test_manifest_sizes_beyond_any_model_are_refused_before_use",),
             "a manifest's sizes are used however large", traces=True),
    Mutation("partial-manifest-names-unchecked", "collection/distributed.py",
             '            infos = Manifest.from_json({**manifest.to_json(), "shards": partial["shards"]}, path).shards',
             '            infos = [ShardInfo(**e) for e in partial["shards"]]',
             (A + "test_a_partial_manifest_naming_a_file_outside_is_refused",),
             "a partial manifest can fold a file outside the folder into the set (then a traceback)", traces=True),
    Mutation("null-text-collected", "collection/sources.py", "        if value is None:  # JSON null",
             "        if False:  # JSON null",
             (A + "test_null_texts_are_skipped_and_counted_never_collected_as_none",),
             'JSON null texts are collected as the string "None" (or stop the collection)'),
    Mutation("csv-error-traceback", "collection/sources.py", '"json", "pandas", "_csv", "csv"', '"json"',
             (A + "test_a_malformed_csv_source_is_one_line",),
             "a malformed CSV source ends in a pandas traceback"),
    Mutation("reversed-layer-range", "collection/collector.py", "            if last < first:",
             "            if False:",
             (A + "test_a_reversed_layer_range_is_refused",),
             '--hidden-layers 3-1 stores no hidden state and reports "layers 0..0"'),
    Mutation("transcode-names-staging", "scripts/transcode_traces.py", "    print(report.format(out=out))",
             "    print(report.format(out=target.dest))",
             (A + "test_transcode_overwrite_names_the_real_destination",),
             "the last line of transcode --overwrite names .incoming as the destination", traces=True),
    Mutation("transcode-keeps-source-codec", "scripts/transcode_traces.py",
             '    kept = {k: v for k, v in m.capture.items() if k != "hidden_codec"}', "    kept = dict(m.capture)",
             (A + "test_transcode_overwrite_names_the_real_destination",),
             "a lossless copy of a fitted set lists the source's codec file", traces=True),
    Mutation("checkpoint-split-unchecked", "models/checkpoint.py",
             "    if not (isinstance(split, dict) and split and all(", "    if False and (isinstance(split, dict) and all(",
             (A + "test_a_damaged_checkpoint_is_one_line",),
             "a checkpoint without its split ends evaluation in a KeyError traceback", traces=True),
    Mutation("empty-destination-accepted", "common/paths.py", "    if not str(path).strip():",
             "    if False:",
             (A + "test_every_destination_is_checked_before_any_work",),
             'an empty --output or --output-dir ("", an unset variable) writes into the current directory', traces=True),
    Mutation("token-ids-past-the-table", "models/checkpoint.py", "    if top >= vocab:", "    if False:",
             (A + "test_token_ids_outside_the_vocabulary_are_refused_before_training",),
             "token ids outside the embedding table end anchored training in an index error", traces=True),
    Mutation("engine-live-context-index-on-host", "offload/prefetch.py",
             "torch.arange(s.context, device=n.device)", "torch.arange(s.context)",
             (EH + "test_the_live_learned_predictor_builds_every_tensor_on_its_device[1-anchored]",),
             "the live context feature's mask is built from a host index: a device op fails on the GPU", traces=True),
    Mutation("bench-accelerate-weights-anywhere", "tools/bench_offload.py",
             'away = [t.device for t in offloaded_weights(model) if t.device.type != "cpu"]', "away = []",
             ("tests/test_bench_offload.py::test_accelerate_offload_keeps_the_offloaded_weights_in_host_memory",),
             "the accelerate baseline is measured with its offloaded weights still in device memory (a model dispatched "
             "from the GPU copies them GPU to GPU)"),
    Mutation("checkpoint-door-skips-the-split", "models/checkpoint.py",
             'if test_ids is not None and not np.array_equal(np.sort(checkpoint_split(ckpt, "test", where)), np.sort(test_ids)):',
             "if False:",
             ("tests/test_safety.py::test_every_scorer_reads_a_checkpoint_through_one_door_that_checks_its_test_split",),
             "a checkpoint is scored on sequences it was trained on (another --seed or trace set), which flatters it"),
    Mutation("folder-removed-before-the-new-one-is-in", "common/atomic.py",
             "            os.replace(dest, aside)  # an empty folder of ours is replaced by the old dest",
             "            shutil.rmtree(dest)",
             ("tests/test_staged_folder.py::test_a_failure_between_the_two_renames_puts_the_old_folder_back",),
             "a model folder is deleted before the new one is renamed in: a crash in between leaves nothing"),
    Mutation("folder-swap-leaves-the-old-aside", "common/atomic.py",
             "        shutil.rmtree(aside, ignore_errors=True)\n", "        pass\n",
             ("tests/test_staged_folder.py::test_an_old_folder_is_replaced_whole_and_its_files_go_with_it",),
             "every save of a model folder leaves the previous one beside it, hidden, until the disk fills"),
    Mutation("engine-live-features-float32", "offload/prefetch.py",
             "                setattr(f, name, getattr(f, name).to(self.cur_hidden.dtype))",
             "                pass",
             (EH + "test_a_learned_predictor_runs_live_in_a_bfloat16_model[hybrid]",),
             "a learned predictor's float32 routing features meet its bfloat16 weights: a bfloat16 model cannot decode"),
    Mutation("validate-default-dir-needs-the-kind", "scripts/validate_coverage_analysis.py",
             "    if args.checkpoint is not None and args.model_type not in BASELINES:  # its kind may be read",
             "    if args.checkpoint is not None and args.model_type in PREDICTORS:  # its kind may be read",
             ("tests/test_safety.py::test_a_checkpoints_report_goes_beside_it_when_its_kind_is_read_from_it",),
             "a checkpoint validated without --model-type writes its report to results/None-d0, not beside it"),
    Mutation("plots-import-the-simulator", "validation/plots.py",
             "    plt = _figure_module()\n    rows = [(c, k) for c in axes[\"compute\"]",
             "    from validation.prefetch.simulator import short_name  # noqa: F811\n    plt = _figure_module()\n"
             "    rows = [(c, k) for c in axes[\"compute\"]",
             ("tests/test_architecture.py::test_no_import_goes_upward",),
             "a figure helper imports the simulator that imports the figures: an upward arrow, a cycle in waiting"),
    Mutation("handle-imports-the-planner-back", "offload/stats.py",
             "        self.replan(e.model, e.device, layout0=e.layout0, **options).apply(e)",
             "        from offload.api import plan\n        plan(e.model, e.device, layout0=e.layout0, **options).apply(e)",
             ("tests/test_architecture.py::test_no_two_modules_import_each_other",),
             "two modules import each other (the handle re-imports the planner that builds it)"),
    # --- the routing-only hybrid: trained and scored from imported routing, no reader asking for hidden states
    Mutation("routing-only-not-in-checkpoint", "training/trainer.py",
             "cfg.input_dim, cfg.routing_only, cfg.own_layers, cfg.window = 0, True, args.own_layers, args.window",
             "cfg.input_dim = 0",
             (RO + "test_the_routing_only_hybrid_trains_on_imported_routing_and_every_reader_scores_it",),
             "--routing-only is not stored in the predictor's config: the hybrid built reads h_l, which an imported "
             "set does not hold"),
    Mutation("routing-only-ignores-previous-tokens", "models/predictors.py",
             "z = z + self.own_proj(f.own_window.flatten(1)) + self.prev_proj(f.window_routing.flatten(1))",
             "z = z + self.own_proj(f.own_window.flatten(1))",
             (RO + "test_on_routing_that_repeats_the_previous_token_the_routing_only_hybrid_learns_to_copy_it",
              RO + "test_every_input_of_the_routing_only_hybrid_reaches_its_output[window_routing]"),
             "the routing-only hybrid drops the previous tokens' experts: its history part is this token's alone"),
    Mutation("coverage-asks-routing-only-for-hidden", "scripts/validate_coverage_analysis.py",
             "        need_hidden = reads_hidden(cfg)", "        need_hidden = True",
             (RO + "test_the_routing_only_hybrid_trains_on_imported_routing_and_every_reader_scores_it",),
             "the coverage analysis asks a routing-only checkpoint's traces for hidden states it never reads"),
    Mutation("validation-asks-routing-only-for-hidden", "validation/coverage/evaluate.py",
             "    hidden = feature_spec(model).hidden", "    hidden = True",
             (RO + "test_the_routing_only_hybrid_trains_on_imported_routing_and_every_reader_scores_it",),
             "training's per-epoch validation asks for hidden states: the routing-only hybrid fails after its first "
             "epoch on an imported set"),
    Mutation("simulator-asks-routing-only-for-hidden", "validation/prefetch/simulator.py",
             "        if missing and reads_stored_hidden(policy):", "        if missing:",
             (RO + "test_the_routing_only_hybrid_trains_on_imported_routing_and_every_reader_scores_it",),
             "prefetch:<routing-only checkpoint> is refused on an imported set for hidden states it never reads"),
    Mutation("routing-only-held-to-hidden-size", "models/checkpoint.py",
             "    hidden = reads_hidden(cfg)\n    mine", "    hidden = True\n    mine",
             (RO + "test_a_routing_only_checkpoint_fits_any_hidden_size_and_a_hidden_reading_one_must_still_match",
              RO + "test_the_routing_only_hybrid_trains_on_imported_routing_and_every_reader_scores_it"),
             "a routing-only checkpoint is refused on traces of another hidden size (or none) than it was trained on"),
    Mutation("live-routing-only-held-to-hidden-size", "offload/prefetch.py",
             "    reads = reads_hidden(cfg)", "    reads = True",
             (E + "test_live_predictions_equal_the_predictor_on_the_same_rows[hybrid-routing-only]",
              RO + "test_a_routing_only_checkpoint_fits_any_hidden_size_and_a_hidden_reading_one_must_still_match"),
             "the offload engine refuses a routing-only checkpoint from imported routing (hidden size 0) on the "
             "model it was recorded from", traces=True),
    Mutation("compare-asks-routing-only-for-hidden", "scripts/compare_predictors.py",
             "predictor_scorer(model, d, m.num_experts), reads_hidden(cfg), info))",
             "predictor_scorer(model, d, m.num_experts), True, info))",
             (RO + "test_compare_predictors_trains_and_scores_the_routing_only_hybrid_beside_the_routing_baselines",),
             "compare_predictors scores its routing-only hybrid with hidden states, which an imported set lacks"),
    Mutation("no-hidden-refusal-forgets-the-flag", "training/checks.py",
             '"--routing-only" if args.model_type == "hybrid" else "--model-type hybrid --routing-only"', "None",
             (RO + "test_the_hidden_reading_predictors_on_imported_routing_are_refused_in_one_line_naming_the_flag",),
             "a hidden-reading predictor on an imported set is refused without naming --routing-only, the one "
             "predictor such a set trains"),
    Mutation("prefetch-victim-peeks-at-this-tokens-score", "validation/prefetch/simulator.py",
             "cap[tl], slot_expert, slot_pin, stamp, rule, t, t - 1,", "cap[tl], slot_expert, slot_pin, stamp, rule, t, t,",
             ("tests/test_policies.py::test_a_prefetch_evicts_by_the_newest_score_that_exists_when_it_is_issued",),
             "a prefetch at layer l evicts by layer l+d's score of this token, which needs this token's input at l+d"),
    Mutation("engine-fast-path-masks-sentinels", "offload/engine.py",
             "return self._call(l, hidden, rows, w, self.local[l], self.C, None, sentinel=False)",
             "return self._call(l, hidden, rows, w, self.local[l], self.C, None, sentinel=True)",
             (E + "test_a_decode_step_on_its_own_slots_runs_no_sentinel_masking[on-demand-15]",),
             "a decode step whose experts are all in its slots still runs the implementation's sentinel masking"),
    Mutation("engine-staged-call-told-no-id-is-absent", "offload/engine.py",
             "dequantize: tuple[torch.Tensor, int] | None, sentinel: bool = True)",
             "dequantize: tuple[torch.Tensor, int] | None, sentinel: bool = False)",
             (E + "test_every_family_generates_the_resident_models_tokens[on-demand-1-deepseek_v2]",),
             "a call with absent experts (sentinel ids) is run as if every id were a row"),
    Mutation("live-features-count-left-pads", "offload/engine.py",
             "live.features(self.B).begin(ids, new_sequence, pads)", "live.features(self.B).begin(ids, new_sequence, None)",
             (E + "test_live_eviction_ranks_equal_the_predictor_after_a_prompt_and_merge_a_batch_by_its_highest[True]",),
             "a left-padded prompt's pads count as earlier tokens of its row in the live features", traces=True),
    Mutation("costs-evictor-never-timed", "offload/costs.py",
             "if e.predictor is not None else (e.evictor, e.evict_learned)",
             "if e.predictor is not None else (None, None)",
             (E + "test_the_eviction_scorer_is_timed_as_the_predictor",),
             "learned eviction's scorer is left out of the predictor's measured time", traces=True),
    Mutation("engine-score-eviction-is-lru", "offload/cache.py",
             "        if eviction == SCORE:\n            sc = score[slot_expert[l, s]]",
             "        if False:\n            sc = score[slot_expert[l, s]]",
             (E + "test_counts_equal_the_simulators_for_forced_routing[evict]",
              E + "test_learned_eviction_runs_live_and_changes_nothing"),
             "the engine's learned eviction frees the least recently used slot, whatever the scores say", traces=True),
    Mutation("engine-forced-scores-of-this-step", "offload/engine.py",
             "return stream.scores[self.policy.evict_key][self.row0 - 1, l]",
             "return stream.scores[self.policy.evict_key][self.row0, l]",
             (E + "test_counts_equal_the_simulators_for_forced_routing[evict]",),
             "with forced routing the engine evicts by this step's scores (the simulator: the previous step's)",
             traces=True),
    Mutation("demand-victim-peeks-at-this-tokens-score", "validation/prefetch/simulator.py",
             "cap[l], slot_expert, slot_pin, stamp, rule, t, t - 1,", "cap[l], slot_expert, slot_pin, stamp, rule, t, t,",
             ("tests/test_policies.py::test_evict_by_score_keeps_what_the_scorer_expects_soon",),
             "a miss evicts by this token's scores, which its scorer computes only after the router"),
    Mutation("evict-scorer-on-the-critical-path", "validation/prefetch/simulator.py",
             "r = now + pre_ms  # router done", "r = now + pre_ms + evict_ms  # router done",
             ("tests/test_policies.py::test_the_eviction_scorer_runs_beside_the_copies_not_before_them",),
             "the eviction scorer delays the router's read, and with it the demand copies"),
    Mutation("evict-scorer-costs-nothing", "validation/prefetch/simulator.py",
             "ready = r + p + evict_ms + shared_ms", "ready = r + p + shared_ms",
             ("tests/test_policies.py::test_the_eviction_scorer_runs_beside_the_copies_not_before_them",),
             "the eviction scorer's time is never paid, even in a layer with no copy to hide it"),
    Mutation("engine-eviction-ranks-never-read", "offload/engine.py",
             "prev = self.prev_ranks[l] if self.prev_ranks[l] is not None else self.no_ranks",
             "prev = self.no_ranks",
             (E + "test_live_predictions_equal_the_predictor_on_the_same_rows[window]",),
             "the live scorer runs but its ranks never reach the host: every eviction is LRU", traces=True),
    Mutation("engine-copies-wait-for-the-eviction-scorer", "offload/engine.py",
             "        self.markers[l] = self.copies.mark()\n        self._stamp(l, \"routed\")\n        if evict:"
             "  # this token's scorer, after the read and the copies' marker: it runs beside the copies\n"
             "            self.prev_ranks[l], tp = self._timed_call(self.evictor, l, x)\n",
             "        self._stamp(l, \"routed\")\n        if evict:\n"
             "            self.prev_ranks[l], tp = self._timed_call(self.evictor, l, x)\n"
             "        self.markers[l] = self.copies.mark()\n        if evict:\n",
             (E + "test_the_eviction_scorer_runs_after_the_copies_marker",),
             "the layer's copies are queued behind the eviction scorer's kernels: the scorer is back on the critical "
             "path", traces=True),
    Mutation("engine-forced-sequence-start-reads-the-last-sequence", "offload/engine.py",
             "if self.row0 == 0 or stream.first[self.row0]:", "if self.row0 == 0:",
             (E + "test_counts_equal_the_simulators_for_forced_routing[evict]",),
             "with forced routing a sequence's first step evicts by the last sequence's scores (the simulator: none)",
             traces=True),
    Mutation("bench-replays-recorded-ranks-a-step-late", "tools/bench_offload.py",
             "stream.scores[pol.evict_key] = np.concatenate([used[1:], np.zeros_like(used[:1])])",
             "stream.scores[pol.evict_key] = used",
             (E + "test_the_benchs_replay_of_a_recorded_learned_eviction_gives_the_engines_counts",),
             "the bench's prediction of a learned eviction row reads the ranks the engine evicted by one step late "
             "(row t-2's at step t)", traces=True),
    Mutation("sim-sequence-start-evicts-by-the-last-sequence", "validation/prefetch/simulator.py",
             "            sc[starts] = 0.0", "            pass",
             ("tests/test_policies.py::test_a_sequence_start_evicts_by_no_score_of_the_last_sequence",),
             "a sequence's first step evicts by the previous sequence's last scores, which the engine never has"),
    Mutation("engine-eviction-ranks-kept-across-sequences", "offload/engine.py",
             "            self.prev_ranks = [None] * self.L\n        self.clock.begin",
             "            pass\n        self.clock.begin",
             (E + "test_a_new_sequence_evicts_by_no_ranks_of_the_last_one",),
             "a new sequence's first step evicts by the last sequence's final ranks", traces=True),
    Mutation("engine-live-order-read-as-scores", "offload/prefetch.py",
             "return torch.searchsorted(v.sort().values, v)", "return v.argsort()",
             (E + "test_live_predictions_equal_the_predictor_on_the_same_rows[window]",),
             "the live eviction sends the experts' order (least to most likely) where the host reads each one's rank",
             traces=True),
    Mutation("live-window-history-reads-this-token", "offload/prefetch.py",
             "self.off = 1 if lookahead == 0 else 0", "self.off = 0",
             (E + "test_live_predictions_equal_the_predictor_on_the_same_rows[window]",),
             "a next-tokens predictor's live history at layer l starts with this token, which record() just wrote",
             traces=True),
    Mutation("live-window-own-routing-of-this-layer", "offload/prefetch.py",
             "last = l if d >= 1 else l - 1  #", "last = l  #",
             (E + "test_live_predictions_equal_the_predictor_on_the_same_rows[window]",),
             "a d = 0 row reads this token's routing at layer l, its own answer", traces=True),
]


# ----------------------------------------------------------------------------------------------

def repo_files(root: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore (new tests not yet added), as in the working tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"{root}: cannot list the repository's files with git ({e})") from None
    return [f for f in sorted(set(out.decode().split("\0"))) if f and (root / f).is_file()]


def copy_files(src: Path, dst: Path, files: list[str]) -> None:
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)


def check_mutation(root: Path, m: Mutation) -> None:
    """One line if the mutation can no longer be applied or names a test that does not exist."""
    path = root / m.file
    if not path.is_file():
        raise UserError(f"mutation {m.name}: {m.file} does not exist (moved? update the mutation)")
    n = path.read_text().count(m.old)
    if n != 1:
        raise UserError(f"mutation {m.name}: its old text {m.old!r} occurs {n} times in {m.file}, not once "
                        "(the code changed: update the mutation so that it still plants its bug)")
    for t in m.tests:
        file, _, func = t.partition("::")
        func = func.split("[")[0]  # a parametrized test's node id names one of its cases
        if not (root / file).is_file() or f"def {func}(" not in (root / file).read_text():
            raise UserError(f"mutation {m.name}: test {t} does not exist")


def apply_mutation(root: Path, m: Mutation) -> None:
    path = root / m.file
    path.write_text(path.read_text().replace(m.old, m.new, 1))


def shared_traces(m: Mutation | None, traces: Path | None) -> Path | None:
    """The shared tiny traces were built by the unmutated code: only the unmutated run and mutations that declare
    they read them get them; any other mutation's tests build their own, so a bug in how traces are written
    reaches the traces its tests read."""
    return traces if m is None or m.traces else None


def pytest_env(copy: Path, traces: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg",
           # jobs run side by side and the tests' matrices are tiny: more threads per job only contend
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if traces is not None:
        env["MOE_TEST_TINY_TRACES"] = str(traces)
    return env


@dataclass
class Outcome:
    name: str
    file: str
    status: str            # killed | survived | timeout (killed) | error
    failed: list[str]
    seconds: float
    tail: str = ""


def run_tests(snapshot: Path, work: Path, m: Mutation | None, tests: tuple[str, ...], traces: Path | None,
              timeout: float, files: list[str]) -> Outcome:
    """A fresh copy of the snapshot, the mutation applied (None: unmutated), its tests run there."""
    name = m.name if m else "(no mutation)"
    copy = Path(tempfile.mkdtemp(prefix=f"{name.strip('()').replace(' ', '-')}-", dir=work))
    t0 = time.perf_counter()
    try:
        copy_files(snapshot, copy, files)
        if m is not None:
            apply_mutation(copy, m)
        xml = copy / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=line", "--hypothesis-profile=mutation",
               "--basetemp", str(copy / ".pytest-tmp"), "--junitxml", str(xml), *tests]
        try:
            proc = subprocess.run(cmd, cwd=copy, env=pytest_env(copy, shared_traces(m, traces)),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(name, m.file if m else "-", "timeout", [], time.perf_counter() - t0)
        failed = []
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
        status = {0: "survived", 1: "killed"}.get(proc.returncode, "error")
        return Outcome(name, m.file if m else "-", status, failed, time.perf_counter() - t0,
                       (proc.stdout + proc.stderr)[-2000:])
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def build_traces(snapshot: Path, out: Path) -> None:
    """The tiny traces, built once by the unmutated code (tests/conftest.py: build_tiny_traces)."""
    code = "import sys; from pathlib import Path; from tests.conftest import build_tiny_traces; build_tiny_traces(Path(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=snapshot, env=pytest_env(snapshot, None),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"building the tiny traces failed:\n{proc.stderr[-2000:]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutations and the tests meant to kill each, and exit")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this mutation (repeatable; default: all)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="mutations tested at once, one pytest process each (default: CPU cores, at most 4)")
    p.add_argument("--traces", default=None, help="a tiny trace set already built by tests/conftest.py's "
                   "build_tiny_traces, reused read-only (default: build one for this run, ~20 s of CPU)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one mutation's tests may take (600); "
                   "a mutation that makes its tests hang counts as killed")
    args = p.parse_args(argv)
    if args.jobs <= 0:
        p.error("--jobs must be positive")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.only if n not in known]
    if unknown:
        raise UserError(f"--only {unknown[0]}: no such mutation (see --list)")
    selected = [known[n] for n in dict.fromkeys(args.only)] if args.only else MUTATIONS
    if args.list:
        for m in selected:
            print(f"{m.name:36s} {m.file:24s} {m.why}")
            for t in m.tests:
                print(f"{'':36s}   killed by {t}")
        return 0
    for m in selected:  # before any work: a mutation that no longer applies is an error, never a silent pass
        check_mutation(REPO, m)
    if args.traces is not None and not (Path(args.traces) / "manifest.json").is_file():
        raise UserError(f"--traces {args.traces}: not a trace set (no manifest.json)")

    t_start = time.perf_counter()
    files = repo_files(REPO)
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        work = Path(tmp)
        snapshot = work / "snapshot"  # the working tree as it is now; every copy is made from this
        copy_files(REPO, snapshot, files)
        traces = Path(args.traces).resolve() if args.traces else None
        if traces is None and any(m.traces for m in selected):
            print("building the tiny traces once with the unmutated code ...", flush=True)
            traces = work / "tiny-traces"
            build_traces(snapshot, traces)
        baseline_tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
        print(f"{len(selected)} mutations, {len(baseline_tests)} distinct tests, {args.jobs} at a time; "
              f"copies under {work}", flush=True)
        outcomes: list[Outcome] = []
        baseline: Outcome | None = None
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            # the unmutated run goes first; its result is judged at the end (a failing baseline voids every kill)
            futures = {pool.submit(run_tests, snapshot, work, None, baseline_tests, traces, args.timeout * 2,
                                   files): None}
            futures.update({pool.submit(run_tests, snapshot, work, m, m.tests, traces, args.timeout, files): m
                            for m in selected})
            bar = tqdm(total=len(futures), desc="mutations", unit="run", dynamic_ncols=True)
            for fut in as_completed(futures):
                o = fut.result()
                if futures[fut] is None:
                    baseline = o
                else:
                    outcomes.append(o)
                status = ("passed" if o.status == "survived" else "FAILED") if futures[fut] is None else o.status
                bar.write(f"{o.name:36s} {status:9s} {o.seconds:6.1f} s")
                bar.update(1)
            bar.close()

    order = {m.name: i for i, m in enumerate(selected)}
    outcomes.sort(key=lambda o: order[o.name])
    print(f"\n{'mutation':36s} {'file':24s} {'killed':7s} {'seconds':>7s}  tests that failed")
    print("-" * 120)
    for o in outcomes:
        killed = {"killed": "yes", "timeout": "yes (timeout)", "survived": "NO"}.get(o.status, "ERROR")
        print(f"{o.name:36s} {o.file:24s} {killed:7s} {o.seconds:7.1f}  {', '.join(o.failed) or '-'}")
    total = time.perf_counter() - t_start
    survived = [o for o in outcomes if o.status == "survived"]
    errors = [o for o in outcomes if o.status == "error"]
    for o in errors:
        print(f"\n{o.name}: pytest stopped with an error, not a test failure:\n{o.tail}")
    if baseline is None or baseline.status != "survived":
        print(f"\nthe listed tests do not pass WITHOUT any mutation ({baseline.status if baseline else 'not run'}); "
              f"no kill above means anything:\n{baseline.tail if baseline else ''}")
        return 1
    kills = len(outcomes) - len(survived) - len(errors)
    print(f"\n{kills} of {len(outcomes)} mutations killed, {len(survived)} survived, {len(errors)} errors; "
          f"unmutated run passed in {baseline.seconds:.0f} s; {total:.0f} s in all, {args.jobs} jobs, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    with one_line_errors("mutation"):
        sys.exit(main())
