"""A run whose FVU comes apart stops, keeps its best weights and says so."""

import torch
from transformers import TrainerControl, TrainerState

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.model.model_card import model_card
from hf_lorsa.training.collapse_guard import CollapseGuard


class FakeTrainer:
    def __init__(self, lorsa):
        self.lorsa, self.step = lorsa, 0

    def lorsas(self):
        return {self.lorsa.config.layer: self.lorsa}

    def metric_name(self, layer, name):
        return name

    def tokens_seen(self):
        return self.step * 1000


def run(guard, trainer, fvus, k=None):
    control = TrainerControl()
    for fvu in fvus:
        trainer.step += 1
        with torch.no_grad():
            trainer.lorsa.w_o.fill_(fvu)  # weights that tell the step they belong to
        guard.on_log(None, TrainerState(), control, logs={"fvu": fvu, "k": k or trainer.lorsa.config.top_k})
        if control.should_training_stop:
            break
    return control


def test_a_run_that_comes_apart_stops_with_its_best_weights():
    lorsa = LorsaModel(LorsaConfig(d_model=16, n_qk_heads=2, d_qk_head=4, n_ov_heads=8, top_k=2, layer=3))
    trainer = FakeTrainer(lorsa)
    guard = CollapseGuard(trainer)
    fvus = [0.5, 0.4, 0.3, 0.28, 0.3, 0.45, 0.9, 1.2, 1.3, 1.3, 1.3]
    control = run(guard, trainer, fvus)
    assert control.should_training_stop and trainer.step < len(fvus)
    report = guard.report
    assert report["layer"] == 3 and report["best_tokens"] == 5000 and "came apart" in report["message"]
    assert torch.all(lorsa.w_o == 0.3)  # the weights of the best (smoothed) point, not the last
    lorsa.config.stopped_early = report
    lorsa.config.training_args = {"seed": 1}
    assert "**Stopped early.** Layer 3's training FVU came apart" in str(model_card(lorsa.config))


def test_a_healthy_run_and_k_annealing_are_left_alone():
    lorsa = LorsaModel(LorsaConfig(d_model=16, n_qk_heads=2, d_qk_head=4, n_ov_heads=8, top_k=2, layer=1))
    trainer = FakeTrainer(lorsa)
    guard = CollapseGuard(trainer)
    assert not run(guard, trainer, [0.9, 0.3, 0.31, 0.29, 0.32, 0.3, 0.28, 0.3]).should_training_stop
    annealing = CollapseGuard(FakeTrainer(lorsa))  # while K anneals the FVU rises by design: not watched
    assert not run(annealing, annealing.trainer, [0.1, 0.5, 0.9, 1.0, 1.0, 1.0], k=8).should_training_stop
    off = CollapseGuard(FakeTrainer(lorsa), enabled=False)
    assert not run(off, off.trainer, [0.3, 0.3, 1.0, 1.0, 1.0, 1.0]).should_training_stop and off.report is None
