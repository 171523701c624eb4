/* memcpy calls of 128 bytes or more, by size and calling function: an LD_PRELOAD shim for
 * benches/memcpy.sh. SIGUSR2 starts counting; a second SIGUSR2 stops and writes
 * "calls size return-address" lines to $MEMCPY_HIST_OUT. Counts are kept in a fixed table
 * (no allocation inside memcpy). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 4096
static struct { uintptr_t at; size_t size; unsigned long calls; } table[SLOTS];
static volatile sig_atomic_t counting;
static void *(*next_memcpy)(void *, const void *, size_t);

static void dump(void) {
    const char *path = getenv("MEMCPY_HIST_OUT");
    FILE *f = fopen(path ? path : "memcpy-hist.txt", "w");
    if (!f) return;
    for (int i = 0; i < SLOTS; i++)
        if (table[i].calls)
            fprintf(f, "%lu %zu %lx\n", table[i].calls, table[i].size, (unsigned long)table[i].at);
    fclose(f);
}

static void toggle(int sig) {
    (void)sig;
    if (counting) { counting = 0; dump(); }
    else { for (int i = 0; i < SLOTS; i++) table[i].calls = 0; counting = 1; }
}

__attribute__((constructor)) static void init(void) { signal(SIGUSR2, toggle); }

void *memcpy(void *dst, const void *src, size_t n) {
    if (!next_memcpy) next_memcpy = (void *(*)(void *, const void *, size_t))dlsym(RTLD_NEXT, "memcpy");
    if (counting && n >= 128) {
        uintptr_t at = (uintptr_t)__builtin_return_address(0);
        unsigned h = (unsigned)(((at >> 2) ^ n) % SLOTS);
        for (int k = 0; k < SLOTS; k++) {
            unsigned j = (h + k) % SLOTS;
            if (table[j].calls == 0) { table[j].at = at; table[j].size = n; table[j].calls = 1; break; }
            if (table[j].at == at && table[j].size == n) { table[j].calls++; break; }
        }
    }
    return next_memcpy(dst, src, n);
}
