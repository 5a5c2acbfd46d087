"""The README's Python block runs as written, once its names are bound: it cannot drift again."""
import torch

import wfnet
from conftest import ROOT, synthetic_images


def readme_block(section):
    text = (ROOT / "README.md").read_text().split(f"\n## {section}\n")[1]
    return text.split("```python\n")[1].split("```")[0]


def test_the_your_own_model_block_runs_on_a_small_model_and_generated_images():
    spec = wfnet.DATASETS["mnist"]
    sets = []
    for seed, n in ((0, 600), (1, 200)):                  # Datasets of (normalized image, label)
        x, y = synthetic_images(n, seed=seed)
        sets.append(torch.utils.data.TensorDataset(wfnet.transform(x, spec), y))
    torch.manual_seed(0)
    model = wfnet.train_original(wfnet.ResNet18(10, 1, 4, 2), sets[0], None, None, 3, 32, 0.05, progress=False)
    names = dict(my_classifier=model, train_set=sets[0], test_set=sets[1])
    exec(readme_block("Your own model"), names)
    res, x = names["res"], names["x"]
    assert len(res["per_class"]) == 10 and res["original"]["test_acc"] > 90
    assert res["mean"]["acc_f_test"] < 10 and res["mean"]["acc_r_drop_test"] < 5   # forgotten, the others kept
    assert torch.allclose(names["plain"](x), names["wf"](x, forget=3), atol=1e-5)
