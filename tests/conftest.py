"""Shared fixtures: the device comes from LWAT_TEST_DEVICE so the same suite runs on CUDA."""

import itertools
import os
import re

# cuBLAS reads this when it first starts: needed for deterministic matrix products on CUDA (see `deterministic`).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
import torch.nn.functional as F

from lwat.data import synthetic_dataset
from lwat.models import build_model


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("LWAT_TEST_DEVICE", "cpu"))


@pytest.fixture
def deterministic():
    """Deterministic kernels for tests that compare two trainings bit for bit: on CUDA, cuDNN's default
    convolution backward kernels accumulate in a varying order (on CPU this changes nothing)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Test tensors are tiny: intra-op threads only add overhead (seconds per test on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained_mlp(one_thread):
    """The paper's toy tanh MLP, shrunk, fitted briefly on 8x8 synthetic data: (eval model, uint8 test images, labels)."""
    torch.manual_seed(0)
    ds = synthetic_dataset(n_train=64, n_test=64, size=8, channels=1)
    model = build_model("mlp_tanh", 10, image_size=8, hidden=(32, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x = ds.train_x.float() / 255
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), ds.train_y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval(), ds.test_x, ds.test_y


# ---- Markers (registered in pyproject.toml), set here from each test's file, name and parameters so that the test
# files carry none. `python -m pytest -m "not slow"` is the quick loop; CI runs everything (`python -m pytest -q`).
MARKERS = ("compile", "distributed", "integrations", "slow")
FILE_MARKERS = {
    "test_distributed.py": {"distributed", "compile"},  # gloo processes; one of its runs is under torch.compile
    "test_integrations.py": {"integrations"},  # examples/ run as a user runs them, each in a process of its own
    "test_integrations_distributed.py": {"integrations", "distributed"},
    "test_integrations_huggingface.py": {"integrations"},
    "test_integrations_lightning.py": {"integrations"},
}
# torch.compile runs where a test's name or a parameter says so (kernels="fused", compiled=True) ...
COMPILES = re.compile(r"(^|_)(compiled?|fused)(_|$)")
# ... but not in these, where a failure replaces it.
NEVER_COMPILES = {"test_kernels_that_cannot_compile_are_one_line_exit_2"}
# Eager tests of which one case took 0.5 s or more (trainings, reproductions, other processes, importing a package
# that only they use): `--durations` on this project's 2-core VM under load 3-6, 2026-12-07. A new test that takes
# 0.5 s or more joins them, so that `-m "not slow"` stays well under a minute.
SLOW = {
    "test_analysis.py": {"test_curves", "test_depth", "test_jacobian_end_to_end", "test_robustness",
                         "test_strength_against_hand_references", "test_table1_control_script_averages_the_seeds",
                         "test_transfer_against_hand_fgsm", "test_tsne_against_hand_references"},
    "test_attacks.py": {"test_fgsm_matches_art", "test_pgd_matches_art_without_random_start"},  # importing ART: 4 s
    "test_cli.py": {"test_analyze_every_analysis_on_tiny_runs",
                    "test_analyze_robustness_right_after_train_names_lwat_eval",
                    "test_config_file_then_flags_and_resume_rules",
                    "test_damaged_or_foreign_checkpoint_is_one_line_exit_2", "test_demo_end_to_end",
                    "test_eval_prints_table_and_writes_json", "test_interrupted_demo_says_how_to_continue",
                    "test_output_piped_into_a_reader_that_stops_is_quiet"},
    "test_compile.py": {"test_fusion_rule_changes_inductor_only_inside_its_block",
                        "test_fusion_rule_leaves_inductor_s_own_rule_in_a_fresh_thread",
                        "test_import_lwat_loads_nothing_of_inductor_or_dynamo"},
    "test_data.py": {"test_digits_and_synthetic", "test_image_folder_errors", "test_shared_cifar10_jpeg"},  # sklearn
    "test_demo.py": {"test_demo_legend_covers_no_data",
                     "test_demo_picture_has_one_colour_per_method_with_mean_and_band"},  # its fixture draws: 5 s
    "test_models.py": {"test_wrn28_10_matches_paper_size", "test_wrn40_10_size"},
    "test_package.py": {"test_an_integration_without_its_framework_names_its_extra",
                        "test_attach_trains_where_the_experiments_extra_is_not_installed",
                        "test_import_lwat_imports_no_platform_package_and_no_private_torch_module",
                        "test_presets_and_help_need_no_extra",
                        "test_readme_loop_example_runs_as_copied_where_the_extra_is_not_installed",
                        "test_the_command_without_the_extra_in_a_fresh_interpreter"},
    "test_perturb_semantics.py": {"test_deepcopy_is_an_independent_attached_model"},
    "test_presets.py": {"test_an_analysis_of_a_run_trained_again_is_not_shown_as_its",
                        "test_an_analysis_of_an_older_version_is_kept_until_it_can_be_computed_again",
                        "test_evaluation_adds_only_the_missing_eps",
                        "test_every_preset_runs_at_smoke_scale_and_reports_beside_the_paper",
                        "test_interrupted_reproduction_resumes", "test_list_presets_and_cli",
                        "test_presets_follow_the_paper_and_the_scales", "test_report_from_small_files_alone",
                        "test_report_numbers_and_claims_are_those_of_the_run_files",
                        "test_second_reproduce_reuses_everything", "test_shared_trainings_have_equal_configs",
                        "test_the_seeds_line_counts_planned_and_further_seeds_apart",
                        "test_time_ratio_compares_runs_made_on_the_same_machine"},
    # importing pytorch-optimizer: 2 s
    "test_regularizers.py": {"test_ema_run_tests_and_evaluates_the_average", "test_sam_step_is_the_hand_written_step",
                             "test_sam_with_lat_refreshes_the_cache_from_the_second_pass"},
    "test_rundir.py": {"test_a_kill_while_the_checkpoint_rotates_leaves_checkpoint_pt",
                       "test_claim_restarts_a_run_that_kept_nothing_and_refuses_a_second_trainer",
                       "test_damaged_newest_checkpoint_resumes_from_the_previous_one_bit_exact",
                       "test_evaluate_run_keeps_a_finished_runs_other_eps",
                       "test_full_disk_at_a_checkpoint_is_one_line_exit_2_and_resume_works",
                       "test_host_json_records_the_machine_the_code_and_the_data", "test_read_run_and_missing_config",
                       "test_resume_after_an_epochs_last_step_warns_nothing",
                       "test_resume_with_both_checkpoints_damaged_is_one_line_exit_2",
                       "test_run_files_are_readable_by_others"},
    "test_scale.py": {"test_amp_training_resumes_bit_exact", "test_benchmark_row_against_hand_counts"},
    "test_sweep.py": {"test_a_killed_run_is_resumed_and_ends_as_an_uninterrupted_one",
                      "test_an_interrupted_training_stops_the_sweep",
                      "test_choice_is_by_mean_validation_accuracy_never_test",
                      "test_smoke_sweep_writes_outputs_then_reuses_everything"},
    "test_train.py": {"test_a_checkpoint_in_the_older_one_process_layout_resumes_bit_exact",
                      "test_non_finite_loss_before_the_first_checkpoint_leaves_the_directory_reusable",
                      "test_non_finite_loss_stops_and_keeps_last_good_checkpoint",
                      "test_resume_mid_epoch_is_bit_exact", "test_run_directory_contents",
                      "test_rundir_and_train_import_each_other_nowhere", "test_sigint_saves_and_resume_continues"},
}


def compiles(item) -> bool:
    name = item.originalname
    if name in NEVER_COMPILES:
        return False
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    return (bool(COMPILES.search(name)) or params.get("compiled") is True
            or any(isinstance(v, str) and v in ("compiled", "fused") for v in params.values()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = set(FILE_MARKERS.get(item.path.name, ()))
        if compiles(item):
            marks.add("compile")
        if marks or item.originalname in SLOW.get(item.path.name, ()):
            marks.add("slow")  # compile, distributed and integrations tests take seconds each
        for mark in sorted(marks):
            item.add_marker(mark)


def pytest_ignore_collect(collection_path, config):
    """A file whose every test -m deselects is not even imported (Lightning and transformers take seconds)."""
    marks = FILE_MARKERS.get(collection_path.name)
    expression = config.getoption("markexpr", "")
    if not marks or not expression:
        return None
    try:
        from _pytest.mark.expression import Expression  # pytest's own -m parser (private: pytest 8 and 9)
        expression = Expression.compile(expression)
    except Exception:  # another pytest: collect the file, and -m deselects its tests as usual
        return None
    others = [m for m in MARKERS if m not in marks]
    for extra in itertools.product((False, True), repeat=len(others)):  # what a test of the file may add
        has = marks | {"slow"} | {m for m, add in zip(others, extra) if add}
        if expression.evaluate(lambda name, **kwargs: name in has):
            return None
    return True
