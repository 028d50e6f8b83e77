cfg = det.model.cfg.anomaly_map

def win(distances, clip, sigma):
    return A.gaussian_blur(distances[:, :1].clamp(0, clip) / clip, sigma)

def up(term, size):
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)

def ex(distances, clip, thr=1.0):
    return ((distances[:, -1:] - thr) / (clip - thr)).clamp(0, 1)

def maxform(g):
    def fn(x, distances, clip, sigma, size):
        return up(torch.maximum(win(distances, clip, sigma), g * ex(distances, clip)).clamp(max=1), size)
    return fn

def gated(tau, g=0.5, term="pixel"):
    def fn(x, distances, clip, sigma, size):
        gate = A._pixel_term(x, cfg) if term == "pixel" else A._latent_term(x, cfg)
        gate = (gate / tau).clamp(0, 1)
        return (up(win(distances, clip, sigma), size) + g * gate * up(ex(distances, clip), size)).clamp(max=1)
    return fn

VARIANTS = [
    ("max_g1", maxform(1.0)),
    ("max_g1.5", maxform(1.5)),
    ("pixgate.25", gated(.25)),
    ("pixgate.5", gated(.5)),
    ("pixgate.25_g.75", gated(.25, .75)),
    ("pixgate.5_g1", gated(.5, 1.0)),
]
