package sparkify;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.attribute.PosixFilePermissions;
import org.apache.hadoop.fs.LocalFileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.RawLocalFileSystem;
import org.apache.hadoop.fs.permission.FsPermission;

/**
 * Hadoop's local file system, setting permissions through java.nio instead of forking `chmod`.
 *
 * <p>Without Hadoop's native library (pip's pyspark has none) RawLocalFileSystem runs a `chmod`
 * process for every file and directory it creates, which dominates writing the songs table's
 * thousands of partition directories. This follows the published hadoop-bare-naked-local-fs.
 * It also writes and checks no .crc checksum files beside the data files.
 */
public class FastLocalFileSystem extends LocalFileSystem {
  public FastLocalFileSystem() {
    super(new Raw());
    setWriteChecksum(false);
    setVerifyChecksum(false);
  }

  /** The raw file system with permissions set in-process. */
  public static class Raw extends RawLocalFileSystem {
    @Override
    public void setPermission(Path p, FsPermission permission) throws IOException {
      String rwx = permission.toString().substring(0, 9).replace('t', 'x').replace('T', '-');
      try {
        Files.setPosixFilePermissions(pathToFile(p).toPath(), PosixFilePermissions.fromString(rwx));
      } catch (UnsupportedOperationException | IllegalArgumentException e) {
        super.setPermission(p, permission);
      }
    }
  }
}
