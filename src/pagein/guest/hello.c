/*
 * The smallest workload: greet from every vCPU in turn, then exit with args[0].
 *
 * args[1] makes vCPU 0 fail on purpose after greeting, to test the VMM's error reports:
 *   1 store to address args[2] (e.g. 0, or beyond guest RAM): a page fault
 *   2 HLT, privileged at CPL 3: a general-protection fault
 *   3 an SSE instruction (fine at CPL 3; kvm_pvm cannot emulate it at CPL 0)
 *   4 UD2: an invalid-opcode exception
 *   5 spin forever without an exit (only a kick from the VMM gets it out of KVM_RUN)
 */
#include "pagein_guest.h"

static void fail(u64 kind, u64 address)
{
    switch (kind) {
    case 1: *(volatile u64 *)address = 0x5a5a5a5a; break;
    case 2: __asm__ volatile("hlt"); break;
    case 3: {
        u64 v = 21;
        __asm__ volatile("movq %0, %%xmm0\n\tpaddq %%xmm0, %%xmm0\n\tmovq %%xmm0, %0" : "+r"(v) : : "xmm0");
        pg_put_u64(v);
        pg_putc('\n');
        break;
    }
    case 4: __asm__ volatile("ud2"); break;
    case 5:
        pg_puts("spinning\n");
        for (;;) __asm__ volatile("pause");
    default: break;
    }
}

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
    if (vcpu == 0 && params->nargs > 1) fail(params->args[1], params->args[2]);
    return params->nargs > 0 ? (int)params->args[0] : 0;
}
