def win(distances, clip, sigma):
    return A.gaussian_blur(distances[:, :1].clamp(0, clip) / clip, sigma)

def up(term, size):
    return F.interpolate(term, size=size, mode="bilinear", align_corners=False)

def ex(distances, clip, thr=1.0):
    return ((distances[:, -1:] - thr) / (clip - thr)).clamp(0, 1)

def view(g=.5, thr=1.0, halo=0.0, hsig=1.0, mx=False):
    def fn(x, distances, clip, sigma, size):
        e = ex(distances, clip, thr)
        v = g * e
        if halo:
            b = A.gaussian_blur(e, hsig)
            b = b / b.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6) * e.amax(dim=(2, 3), keepdim=True) if False else b
            v = torch.maximum(v, halo * b) if mx else v + halo * b
        return up((win(distances, clip, sigma) + v).clamp(max=1), size)
    return fn

VARIANTS = [
    ("g.6", view(.6)),
    ("g.75", view(.75)),
    ("thr1.1_g.6", view(.6, 1.1)),
    ("thr1.25_g.75", view(.75, 1.25)),
    ("halo.5max_s.5", view(.5, 1.0, 1.0, .5, True)),
    ("halo.5max_s1", view(.5, 1.0, 1.0, 1.0, True)),
    ("halo+.25_s1", view(.5, 1.0, .25, 1.0)),
]
