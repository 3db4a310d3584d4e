/* Reference fused loop for hpcflow's bench: leapfrog HMC trajectories of the 2D lattice
 * phi^4 theory on a batch of B chains, one pass over the sites per MD step.
 *
 * Conventions (PHYSICS.md sections 1 and 4, the same as hpcflow.action.Phi4Action):
 *
 *   S(phi) = sum_x [ -beta sum_{mu=1,2} phi_x phi_{x+mu} + phi_x^2 + lam (phi_x^2 - 1)^2 ]
 *   F_x    = beta sum_{+-mu} phi_{x+-mu} - 2 phi_x - 4 lam phi_x (phi_x^2 - 1)
 *
 *   leapfrog, eps = tau / n:  pi += eps/2 F(phi);
 *                             n times { phi += eps pi;  pi += a eps F(phi) },
 *                             a = 1 except the last kick, a = 1/2.
 *
 * Layout: phi, pi are float64 [B, L0, L1] C-contiguous (a torch batch), periodic in both
 * lattice directions; S is float64 [B].  Chains are independent, so each chain runs its
 * whole trajectory while its two fields (16 L0 L1 bytes) sit in cache.  Within a row the
 * sites 1 .. L1-2 have their left and right neighbours at +-1 in memory: that inner loop
 * has no index arithmetic and vectorises; the two edge sites are done apart.
 *
 * The expression order follows Phi4Action.force (neighbour sum ((l + r) + u) + d, then
 * beta * sum - 2 phi - (4 lam) phi (phi^2 - 1)), so the trajectory agrees with torch's to
 * rounding; compiled with floating-point contraction (FMA) the last bits may differ.
 */
#include <stddef.h>

static inline double force_site(double c, double l, double r, double u, double d,
                                double beta, double lam4)
{
    double nsum = ((l + r) + u) + d;
    return (beta * nsum - 2.0 * c) - lam4 * c * (c * c - 1.0);
}

/* pi += a F(phi) over one chain of L0 x L1 sites (a = kick coefficient times eps). */
static void kick(const double *restrict phi, double *restrict pi, ptrdiff_t L0, ptrdiff_t L1,
                 double a, double beta, double lam4)
{
    for (ptrdiff_t x0 = 0; x0 < L0; x0++) {
        const double *restrict c = phi + x0 * L1;
        const double *restrict up = phi + ((x0 + L0 - 1) % L0) * L1;   /* x0 - 1 */
        const double *restrict dn = phi + ((x0 + 1) % L0) * L1;        /* x0 + 1 */
        double *restrict p = pi + x0 * L1;
        if (L1 == 1) {
            p[0] += a * force_site(c[0], c[0], c[0], up[0], dn[0], beta, lam4);
            continue;
        }
        p[0] += a * force_site(c[0], c[L1 - 1], c[1], up[0], dn[0], beta, lam4);
        for (ptrdiff_t x1 = 1; x1 < L1 - 1; x1++)
            p[x1] += a * force_site(c[x1], c[x1 - 1], c[x1 + 1], up[x1], dn[x1], beta, lam4);
        p[L1 - 1] += a * force_site(c[L1 - 1], c[L1 - 2], c[0], up[L1 - 1], dn[L1 - 1],
                                    beta, lam4);
    }
}

/* S(phi) of one chain. */
static double action(const double *restrict phi, ptrdiff_t L0, ptrdiff_t L1, double beta,
                     double lam)
{
    double S = 0.0;
    for (ptrdiff_t x0 = 0; x0 < L0; x0++) {
        const double *restrict c = phi + x0 * L1;
        const double *restrict dn = phi + ((x0 + 1) % L0) * L1;
        for (ptrdiff_t x1 = 0; x1 < L1; x1++) {
            double v = c[x1], fwd = c[x1 + 1 < L1 ? x1 + 1 : 0] + dn[x1], v2 = v * v;
            S += -beta * v * fwd + v2 + lam * (v2 - 1.0) * (v2 - 1.0);
        }
    }
    return S;
}

/* One leapfrog trajectory of n_steps steps of size eps for each of the B chains, in place:
 * phi, pi [B, L0, L1] are overwritten by the end point, S [B] receives S(phi_end). */
void hpcflow_leapfrog(double *phi, double *pi, double *S, long B, long L0, long L1,
                      double beta, double lam, double eps, long n_steps)
{
    const ptrdiff_t V = (ptrdiff_t)L0 * L1;
    const double lam4 = 4.0 * lam;
    for (long b = 0; b < B; b++) {
        double *restrict f = phi + b * V, *restrict p = pi + b * V;
        kick(f, p, L0, L1, 0.5 * eps, beta, lam4);
        for (long step = 0; step < n_steps; step++) {
            for (ptrdiff_t x = 0; x < V; x++)
                f[x] += eps * p[x];
            kick(f, p, L0, L1, step < n_steps - 1 ? eps : 0.5 * eps, beta, lam4);
        }
        S[b] = action(f, L0, L1, beta, lam);
    }
}
