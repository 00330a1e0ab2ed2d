"""lwat in the Hugging Face Trainer: one callback on a BERT-style model, perturbation points after every LayerNorm.

A tiny random-weight BERT (nothing downloaded) on synthetic token sequences (label: whether token 7 occurs),
runs in seconds on a CPU:
    python examples/huggingface_trainer.py --steps 100
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from lwat.integrations.huggingface import LayerwiseAdversarialCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, length=16, vocab=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, vocab, (n, length), generator=g)
        self.ids[: n // 2, 3] = 7  # half the sequences hold token 7
        self.ids = self.ids[torch.randperm(n, generator=g)]
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--eps", type=float, default=10.0, help="lwat eps (range scaling, the paper's {10, 20, 30})")
    parser.add_argument("--out", type=Path, default=Path("hf_out"), help="the Trainer's output_dir")
    args = parser.parse_args()

    config = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    lat = LayerwiseAdversarialCallback(args.eps, points=nn.LayerNorm)  # a point after every LayerNorm
    training = TrainingArguments(output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=16,
                                 learning_rate=1e-3, save_steps=max(1, args.steps // 2), report_to="none",
                                 use_cpu=True, logging_steps=max(1, args.steps // 4), disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(512), callbacks=[lat])
    trainer.train()  # resume with trainer.train(resume_from_checkpoint=True): the cache comes back too
    trainer.save_model(str(args.out / "final"))
    plain = BertForSequenceClassification.from_pretrained(str(args.out / "final"))  # the plain architecture
    data = Tokens(256, seed=1)
    with torch.no_grad():
        acc = (plain.eval()(input_ids=data.ids).logits.argmax(1) == data.labels).float().mean().item()
    points = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    print(f"trained {trainer.state.global_step} steps with {points} perturbation points: "
          f"held-out accuracy {acc:.3f}; model in {args.out / 'final'}")


if __name__ == "__main__":
    main()
