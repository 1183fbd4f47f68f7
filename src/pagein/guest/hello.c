/* The smallest workload: greet from every vCPU in turn, then exit with args[0]. */
#include "pagein_guest.h"

int guest_main(u64 vcpu, const struct pg_params *params)
{
    for (u64 i = 0; i < params->vcpus; i++) {
        if (i == vcpu) {
            pg_puts("hello from vcpu ");
            pg_put_u64(vcpu);
            pg_putc('\n');
        }
        pg_barrier();
    }
    return params->nargs > 0 ? (int)params->args[0] : 0;
}
