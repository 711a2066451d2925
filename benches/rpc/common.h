/* Shared helpers for the RPC benchmark peers (benches/rpc_echo.sh). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* utime + stime of a process in seconds (from /proc/PID/stat), or -1. pid 0 = self. */
static double cpu_s(long pid) {
  char path[64], buf[1024];
  if (pid > 0) snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  else snprintf(path, sizeof path, "/proc/self/stat");
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  if (!p) return -1;
  unsigned long ut = 0, st = 0;
  /* after ") ": state(3) ... utime is field 14, stime 15 */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) return -1;
  return (double)(ut + st) / sysconf(_SC_CLK_TCK);
}

/* Busy seconds of the whole machine (all cpus) from /proc/stat. */
static double machine_busy_s(void) {
  unsigned long long v[8] = {0};
  FILE *f = fopen("/proc/stat", "r");
  if (!f) return 0;
  if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) != 8) v[0] = 0;
  fclose(f);
  return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / sysconf(_SC_CLK_TCK);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Latency samples (seconds), bounded. */
#define MAX_SAMPLES 20000000
static double *samples;
static long nsamples;
static void sample(double s) {
  if (!samples) samples = malloc(sizeof(double) * MAX_SAMPLES);
  if (nsamples < MAX_SAMPLES) samples[nsamples++] = s;
}

/* Prints "RESULT rate=... p50_us=... p99_us=... client_cpu=... server_cpu=... others_cpu=..."
 * (CPU in % of one core over the measured window; others = rest of the machine). */
static void report(const char *name, long calls, double elapsed, double ccpu, double scpu, double others) {
  double p50 = 0, p99 = 0;
  if (nsamples > 0) {
    qsort(samples, nsamples, sizeof(double), cmp_double);
    p50 = samples[(long)(nsamples * 0.50)] * 1e6;
    p99 = samples[(long)(nsamples * 0.99)] * 1e6;
  }
  printf("%s: %ld round trips in %.2f s\n", name, calls, elapsed);
  printf("RESULT rate=%.0f p50_us=%.1f p99_us=%.1f client_cpu=%.0f server_cpu=%.0f others_cpu=%.0f\n",
         calls / elapsed, p50, p99, ccpu, scpu, others < 0 ? 0 : others);
  fflush(stdout);
}
