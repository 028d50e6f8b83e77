from decodiff_cli.datasets import discover
labels = [s.defect for s in discover(data)[0].samples]
good = torch.cat([x.novelty[[labels[o + j] == "good" for j in range(len(x.z0))], -1].flatten()
                  for o, x in zip(__import__("itertools").accumulate([0] + [len(x.z0) for x in cache[:-1]]), cache)])
R = {q: float(torch.quantile(good, q)) for q in (0.99, 0.995, 0.998, 0.999)}
print("good-image position distance quantiles (q99 units):", {k: round(v, 3) for k, v in R.items()}, flush=True)

def win(distances, clip, sigma):
    return A.gaussian_blur(distances[:, :1].clamp(0, clip) / clip, sigma)

def up(term, size):
    return F.interpolate(term.clamp(max=1), size=size, mode="bilinear", align_corners=False)

def view(thr=1.0, gain=0.5, top=None, power=1.0, vsig=0.0):
    def fn(x, distances, clip, sigma, size):
        d = distances[:, -1:]
        hi = clip if top is None else top
        e = ((d - thr) / (hi - thr)).clamp(0, 1) ** power
        return up(win(distances, clip, sigma) + gain * A.gaussian_blur(e, vsig), size)
    return fn

def none(x, distances, clip, sigma, size):
    return up(win(distances, clip, sigma), size)

r = R[0.999]
VARIANTS = [
    ("none", none),
    ("thr1.25", view(1.25)),
    ("thr1.5", view(1.5)),
    ("thr1.5_g.75", view(1.5, .75)),
    ("thr1.5_top3_g1", view(1.5, 1.0, 3.0)),
    ("thr2_top3_g1", view(2.0, 1.0, 3.0)),
    ("q999_g.5", view(r, .5, 2 * r)),
    ("q999_g.75", view(r, .75, 2 * r)),
    ("q999_g1", view(r, 1.0, 2 * r)),
    ("pow2", view(1.0, .5, None, 2.0)),
    ("pow2_g.75", view(1.0, .75, None, 2.0)),
    ("vsig.5", view(1.0, .5, None, 1.0, .5)),
]
