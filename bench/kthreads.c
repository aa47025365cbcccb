/* Stand-ins for the kernel threads of the benchmark's 256-CPU host, for the shell way's
 * kernel-thread pass (seed 003's pinKthreads: every task with PF_KTHREAD, `taskset` each).
 * The benchmark cannot touch this machine's own kernel threads, so it starts processes of its
 * own, one per kernel thread such a host has, and describes each in the host tree as the
 * kernel would: `proc/<pid>/stat` with PF_KTHREAD in its flags (and PF_NO_SETAFFINITY for the
 * per-CPU ones), `proc/<pid>/status` with its Cpus_allowed_list, `proc/<pid>/comm`.
 *
 *   kthreads <root> <cpus> <per-cpu> <unbound>
 *
 * Per CPU: cpuhp/N, migration/N, ksoftirqd/N, kworker/N:0, kworker/N:0H, kworker/N:1 (the
 * first <per-cpu> of them), bound to CPU N; then <unbound> kworker/u<2*cpus>:K on every CPU.
 * Prints the number started, then waits; every child dies with it (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define PF_KTHREAD 0x00200000u
#define PF_NO_SETAFFINITY 0x04000000u

static const char *const per_cpu[] = {"cpuhp/%d", "migration/%d", "ksoftirqd/%d",
				      "kworker/%d:0", "kworker/%d:0H", "kworker/%d:1"};

static void put(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	if (!f || fputs(text, f) < 0 || fclose(f)) {
		perror(path);
		exit(1);
	}
}

static void describe(const char *root, pid_t pid, const char *comm, unsigned flags,
		     const char *allowed)
{
	char dir[4096], path[4200], text[512];
	snprintf(dir, sizeof dir, "%s/proc/%d", root, (int)pid);
	if (mkdir(dir, 0755)) {
		perror(dir);
		exit(1);
	}
	snprintf(path, sizeof path, "%s/stat", dir);
	snprintf(text, sizeof text,
		 "%d (%s) S 2 0 0 0 -1 %u 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0 18446744073709551615 "
		 "0 0 0 0 0 0 0 2147483647 0 0 0 0 17 0 0 0 0 0 0\n",
		 (int)pid, comm, flags);
	put(path, text);
	snprintf(path, sizeof path, "%s/status", dir);
	snprintf(text, sizeof text, "Name:\t%s\nPid:\t%d\nCpus_allowed_list:\t%s\n", comm,
		 (int)pid, allowed);
	put(path, text);
	snprintf(path, sizeof path, "%s/comm", dir);
	snprintf(text, sizeof text, "%s\n", comm);
	put(path, text);
}

static pid_t child(void)
{
	pid_t parent = getpid(), pid = fork();
	if (pid < 0) {
		perror("fork");
		exit(1);
	}
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(0);
		for (;;)
			pause();
	}
	return pid;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: kthreads <root> <cpus> <per-cpu> <unbound>\n");
		return 2;
	}
	const char *root = argv[1];
	int cpus = atoi(argv[2]), kinds = atoi(argv[3]), unbound = atoi(argv[4]);
	if (kinds > (int)(sizeof per_cpu / sizeof *per_cpu))
		kinds = sizeof per_cpu / sizeof *per_cpu;
	char comm[64], allowed[32], all[32];
	snprintf(all, sizeof all, "0-%d", cpus - 1);
	int n = 0;
	for (int c = 0; c < cpus; c++)
		for (int k = 0; k < kinds; k++, n++) {
			snprintf(comm, sizeof comm, per_cpu[k], c);
			snprintf(allowed, sizeof allowed, "%d", c);
			describe(root, child(), comm, PF_KTHREAD | PF_NO_SETAFFINITY, allowed);
		}
	for (int u = 0; u < unbound; u++, n++) {
		snprintf(comm, sizeof comm, "kworker/u%d:%d", 2 * cpus, u);
		describe(root, child(), comm, PF_KTHREAD, all);
	}
	printf("%d\n", n);
	fflush(stdout);
	for (;;)
		pause();
}
