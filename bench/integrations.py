"""Tuned schedules outside steptune: the k-diffusion sampler, the sigma-list export, img2img and interpolated NFEs.

One S^3 job searches gmm-digits at NFE 5, 6, 8 and 10 (``--budget`` cheap evaluations per NFE), another at 7 and 9
(the direct searches the interpolated schedules are compared with). On the held-out bank:

* for the best schedules at NFE 5, 6, 8: RMSE and model calls of (a) steptune's sampler, (b) the k-diffusion sampler
  (``steptune.integrations.kdiffusion``) on the schedule's own sigma list, (c) that sigma list run by k-diffusion's own
  sample_dpmpp_2m, sample_euler and sample_heun. (a) and (b) end at the schedule's last time and are measured against
  the exact solution there; (c) ends at sigma 0 and is measured against the exact solution at 0;
* img2img at denoise 1.0, 0.75, 0.5 (NFE 5 and 8): from x = alpha x0 + sigma eps at t_d (held-out data, the bank's
  noise), the re-timed tuned schedule on ``sampler.sigmas(denoise)`` (and re-timed with the other anchor, absolute
  lambda position) against k-diffusion's DPM++ 2M and Euler on the same list, each against the exact solution from
  t_d;
* NFE 7 and 9 interpolated from the 5, 6, 8, 10 study (``retime.interpolate``, each method: split, blend, pad)
  against the best preset at that NFE and the direct search, and NFE 12, above the study, against the best preset
  and the study's NFE 10.

    python bench/integrations.py --budget 150

Saves runs/bench/integrations-seedSEED.json and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import save_json  # noqa: E402
from kdiffusion_lib import kdiffusion  # noqa: E402

from steptune.backends import LocalBackend  # noqa: E402
from steptune.evaluators.metrics import rmse  # noqa: E402
from steptune.exports import k_diffusion_sigmas  # noqa: E402
from steptune.integrations.kdiffusion import denoiser, sampler  # noqa: E402
from steptune.jobs import job_from_dict  # noqa: E402
from steptune.runner import Runner  # noqa: E402
from steptune.search import CONFIRM, DEFAULT_PRESETS  # noqa: E402
from steptune.space.retime import METHODS, interpolate, retime  # noqa: E402
from steptune.storage import connect  # noqa: E402
from steptune.sweep import best_by_nfe, run_sweep  # noqa: E402


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def job(args, nfes, study):
    return job_from_dict({"study": study, "seed": args.seed, "problem": {"name": "gmm-digits"},
                          "search": {"method": "s3", "nfe": nfes},
                          "evaluation": {"cheap_samples": 128, "confirm": 3, "baseline": False, "cache": "runs/cache"},
                          "budget": {"evaluations": args.budget}, "backend": {"kind": "local", "num_cpus": 1}})


def kd_run(fn, den, x, sigmas):
    d = Counted(den)
    out = fn(d, x, torch.tensor(sigmas, dtype=x.dtype), disable=True)
    return out, d.calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=150, help="cheap evaluations per NFE of each search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=512, help="held-out states measured")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    first = job(args, [5, 6, 8, 10], "study")
    backend = LocalBackend(first.problem, first.evaluation, first.backend)
    backend.start()
    ev = backend.worker.evaluator
    prob, ns = ev.problem, ev.problem.noise
    tmp = tempfile.TemporaryDirectory(prefix="integrations-")
    db = connect(f"sqlite:///{Path(tmp.name) / 'db.sqlite'}")
    best = {}
    for nfes, study in (([5, 6, 8, 10], "study"), ([7, 9], "direct")):
        Runner(job(args, nfes, study), db, backend).run()
        best[study] = {t.nfe: t.to_schedule() for t in db.best_per_nfe(study, fidelity=CONFIRM)}
    search_s = time.perf_counter() - t0

    n = args.samples
    x_T = ev.x_T("heldout", n).double()
    ref_end, ref_zero = ev.reference("heldout")[:n].double(), ev.reference("heldout", 0.0)[:n].double()
    den = denoiser(prob.model)
    ks = kdiffusion("sampling")
    stock = {"dpmpp_2m": ks.sample_dpmpp_2m, "euler": ks.sample_euler, "heun": ks.sample_heun}

    rows = []
    for nfe in (5, 6, 8):
        s = best["study"][nfe]
        res = ev.evaluate(s, bank="heldout", n=n)
        a0, a1 = float(ns.alpha(s.t_start)), float(ns.alpha(s.times[-1]))
        tuned = sampler(s, data_mean=prob.model.data_mean)
        out, calls = kd_run(tuned, den, x_T / a0, tuned.own_sigmas())
        row = {"nfe": nfe, "steptune": {"rmse": res.metrics["rmse"], "calls": s.nfe},
               "kdiffusion_sampler": {"rmse": rmse(out * a1, ref_end), "calls": calls}}
        for name, fn in stock.items():
            out, calls = kd_run(fn, den, x_T / a0, k_diffusion_sigmas(s))
            row[f"sigmas_{name}"] = {"rmse": rmse(out, ref_zero), "calls": calls}
        rows.append(row)

    img2img = []
    data = prob.data_samples(n, torch.Generator().manual_seed(7)).double()
    eps = x_T / float(ns.sigma(prob.t_start))  # the bank's noise, reused as the img2img noise
    for nfe in (5, 8):
        tuned = sampler(best["study"][nfe], data_mean=prob.model.data_mean)
        for d in (1.0, 0.75, 0.5):
            sig = tuned.sigmas(d)
            t_d = tuned.time_of(sig[:1])[0]
            a, sg = float(ns.alpha(t_d)), float(ns.sigma(t_d))
            x = x_T if d == 1.0 else a * data + sg * eps
            plan = tuned.plan(sig)
            t_last = plan.schedule.times[-1]
            (r_end, r_zero), _ = prob.reference_states(x, [t_d, t_last, 0.0], cache_dir=None)
            out, calls = kd_run(tuned, den, x / a, sig)
            row = {"nfe": nfe, "denoise": d, "sigma_start": sig[0],
                   "tuned": {"rmse": rmse(out * float(ns.alpha(t_last)), r_end), "calls": calls}}
            if plan.retimed:  # the other anchor of the re-timing rule, on the same grid
                alt = retime(tuned.schedule, plan.schedule.times, from_noise=False, anchor="absolute")
                out, calls = kd_run(sampler(alt), den, x / a, sig)
                row["tuned_absolute"] = {"rmse": rmse(out * float(ns.alpha(t_last)), r_end), "calls": calls}
            for name in ("dpmpp_2m", "euler"):
                theirs, their_calls = kd_run(stock[name], den, x / a, sig)
                row[name] = {"rmse": rmse(theirs, r_zero), "calls": their_calls}
            img2img.append(row)

    sweep = run_sweep(ev, list(DEFAULT_PRESETS), [7, 9, 12], bank="heldout")
    best_preset = best_by_nfe(sweep)
    interp = []
    study_10 = ev.evaluate(best["study"][10], bank="heldout").metrics["rmse"]
    for nfe in (7, 9, 12):  # 12: above the study, compared with its NFE 10 as no direct search was run
        direct = ev.evaluate(best["direct"][nfe], bank="heldout").metrics["rmse"] if nfe in best["direct"] else None
        bp = best_preset[nfe]
        for method in METHODS:
            got = ev.evaluate(interpolate(best["study"], nfe, method=method), bank="heldout").metrics["rmse"]
            interp.append({"nfe": nfe, "method": method, "interpolated": got, "direct_search": direct,
                           "best_preset": bp["rmse"], "best_preset_name": bp["preset"],
                           "preset_over_interpolated": bp["rmse"] / got,
                           "interpolated_over_direct": None if direct is None else got / direct,
                           "study_nfe_10": study_10})

    print(f"gmm-digits, held-out bank ({n} states); S^3 budget {args.budget} per NFE, seed {args.seed}; "
          f"searches {search_s:.0f} s (loaded machine)")
    print("\nRMSE (model calls)   steptune     k-diffusion sampler   sigma list: DPM++ 2M    Euler          Heun")
    for r in rows:
        cells = [r[k] for k in ("steptune", "kdiffusion_sampler", "sigmas_dpmpp_2m", "sigmas_euler", "sigmas_heun")]
        print(f"NFE {r['nfe']:<17}" + "".join(f"{c['rmse']:.4f} ({c['calls']:>2})     " for c in cells))
    print("\nimg2img  NFE  denoise  sigma_start   tuned (calls)   absolute anchor   same sigmas: DPM++ 2M   Euler")
    for r in img2img:
        alt = r.get("tuned_absolute")
        print(f"         {r['nfe']:<4} {r['denoise']:<8} {r['sigma_start']:<11.4g} {r['tuned']['rmse']:.4f} "
              f"({r['tuned']['calls']:>2})     " + (f"{alt['rmse']:.4f} ({alt['calls']:>2})" if alt else " " * 12)
              + f"      {r['dpmpp_2m']['rmse']:.4f} ({r['dpmpp_2m']['calls']:>2})"
              f"      {r['euler']['rmse']:.4f} ({r['euler']['calls']:>2})")
    print(f"\ninterpolated  NFE  method  RMSE     direct search  best preset          preset/interp  interp/direct"
          f"  (the study's NFE 10: {study_10:.4f})")
    for r in interp:
        direct = r["direct_search"]
        print(f"              {r['nfe']:<4} {r['method']:<7} {r['interpolated']:.4f}   "
              + (f"{direct:.4f}" if direct is not None else "  —   ") + "         "
              f"{r['best_preset']:.4f} {r['best_preset_name']:<12} {r['preset_over_interpolated']:.2f}x"
              "          " + (f"{r['interpolated_over_direct']:.2f}" if direct is not None else "—"))
    path = save_json(f"integrations-seed{args.seed}", {"budget": args.budget, "seed": args.seed, "samples": n,
                                      "search_seconds": search_s, "rows": rows, "img2img": img2img,
                                      "interpolated": interp,
                                      "schedules": {k: {n_: s.to_dict() for n_, s in v.items()}
                                                    for k, v in best.items()}})
    print(f"saved {path}")
    backend.close()
    db.close()


if __name__ == "__main__":
    main()
